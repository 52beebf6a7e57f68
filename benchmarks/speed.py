"""Side-by-side CPU speed and memory: dense vs projected FLM train step, the PyTorch
reference module, and FMLM one-step sampling (SPEC §10; issue "Performance").

Each variant runs in its own subprocess, so its peak RSS is its own; the variants run
one after the other in one invocation, so machine noise mostly cancels in the ratios.
The last line is one JSON object with medians:
{"dense_step_s", "projected_step_s", "torch_step_s", "dense_peak_mb", "projected_peak_mb",
 "fmlm_1step_samples_per_s", "torch_fmlm_1step_samples_per_s"}

python benchmarks/speed.py [--width narrow|small] [--batch 8] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, LENGTH = 30522, 128  # LM1B-like shape
WIDTHS = {  # (hidden, blocks, heads, cond)
    "narrow": (128, 2, 2, 128),
    "small": (768, 12, 12, 128),
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model_config(width: str, two_time: bool):
    from fmlm_jax.model import model_config

    hidden, blocks, heads, cond = WIDTHS[width]
    return model_config("small", VOCAB, hidden_size=hidden, n_blocks=blocks, n_heads=heads,
                        cond_dim=cond, dropout=0.0, two_time=two_time)


def run_jax_train(width: str, batch: int, steps: int, projected: bool) -> dict:
    import jax
    import ml_collections
    import numpy as np

    from fmlm_jax import train

    config = ml_collections.ConfigDict()
    config.model = _model_config(width, False)
    config.flm = dict(tau_min=0.0, tau_max=1.0, projected_noise=projected)
    config.train = dict(lr=3e-4, warmup_steps=10, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                        grad_clip=1.0, ema_decay=0.9999)
    state = train.create_train_state(config, jax.random.key(0))
    step_fn = train.jit_train_step(config)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (batch, LENGTH)).astype(np.int32)
    batch_dict = {"tokens": jax.numpy.asarray(tokens)}
    rng = jax.random.key(1)
    state, metrics = step_fn(state, batch_dict, rng)  # compile
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch_dict, rng)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "peak_mb": _peak_mb()}


def run_torch_train(width: str, batch: int, steps: int) -> dict:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torch_dit import TorchDiT

    hidden, blocks, heads, cond = WIDTHS[width]
    torch.manual_seed(0)
    model = TorchDiT(VOCAB, hidden, cond, heads, blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    tokens = torch.randint(0, VOCAB, (batch, LENGTH))

    def step():
        tau = torch.rand(batch)
        t = tau  # the τ↔t map costs nothing here; shapes and FLOPs are what matter
        eps = torch.randn(batch, LENGTH, VOCAB)
        x_t = (1 - t)[:, None, None] * eps + t[:, None, None] * torch.nn.functional.one_hot(
            tokens, VOCAB).float()
        logits = model(x_t, tau)
        log_p = torch.log_softmax(30 * torch.tanh(logits / 30), -1)
        loss = -log_p.gather(-1, tokens[..., None]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "peak_mb": _peak_mb()}


def run_jax_fmlm(width: str, batch: int, steps: int) -> dict:
    import jax

    from fmlm_jax.model import init_params
    from fmlm_jax.sampling import fmlm_sample

    cfg = _model_config(width, True)
    params = init_params(cfg, jax.random.key(0))
    z0 = jax.random.normal(jax.random.key(1), (batch, LENGTH, VOCAB))
    jax.block_until_ready(fmlm_sample(params, cfg, z0, 1))  # compile
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fmlm_sample(params, cfg, z0, 1))
        times.append(time.perf_counter() - start)
    return {"samples_per_s": batch / statistics.median(times), "peak_mb": _peak_mb()}


def run_torch_fmlm(width: str, batch: int, steps: int) -> dict:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torch_dit import TorchDiT

    hidden, blocks, heads, cond = WIDTHS[width]
    model = TorchDiT(VOCAB, hidden, cond, heads, blocks, two_time=True).eval()
    z0 = torch.randn(batch, LENGTH, VOCAB)

    @torch.no_grad()
    def sample():
        logits = model(z0, torch.zeros(batch), torch.ones(batch))
        return torch.log_softmax(30 * torch.tanh(logits / 30), -1).argmax(-1)

    sample()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sample()
        times.append(time.perf_counter() - start)
    return {"samples_per_s": batch / statistics.median(times), "peak_mb": _peak_mb()}


VARIANTS = {
    "dense": lambda a: run_jax_train(a.width, a.batch, a.steps, projected=False),
    "projected": lambda a: run_jax_train(a.width, a.batch, a.steps, projected=True),
    "torch": lambda a: run_torch_train(a.width, a.batch, a.steps),
    "fmlm": lambda a: run_jax_fmlm(a.width, a.batch, a.steps),
    "torch_fmlm": lambda a: run_torch_fmlm(a.width, a.batch, a.steps),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", choices=sorted(WIDTHS), default="narrow")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: run one variant, print its JSON
        print(json.dumps(VARIANTS[args.variant](args)))
        return
    results = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, "--width", args.width,
               "--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:>10}: {results[name]}", flush=True)
    summary = {
        "dense_step_s": results["dense"]["step_s"],
        "projected_step_s": results["projected"]["step_s"],
        "torch_step_s": results["torch"]["step_s"],
        "dense_peak_mb": results["dense"]["peak_mb"],
        "projected_peak_mb": results["projected"]["peak_mb"],
        "fmlm_1step_samples_per_s": results["fmlm"]["samples_per_s"],
        "torch_fmlm_1step_samples_per_s": results["torch_fmlm"]["samples_per_s"],
    }
    print(f"width={args.width} batch={args.batch} L={LENGTH} K={VOCAB}: dense/projected step "
          f"{summary['dense_step_s'] / summary['projected_step_s']:.2f}x, dense/torch step "
          f"{summary['dense_step_s'] / summary['torch_step_s']:.2f}x, FMLM 1-step jax/torch "
          f"{summary['fmlm_1step_samples_per_s'] / summary['torch_fmlm_1step_samples_per_s']:.2f}x",
          flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
