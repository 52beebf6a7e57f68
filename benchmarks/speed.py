"""Side-by-side CPU speed and memory: dense vs projected FLM train step, the PyTorch
reference module, FMLM one-step and FLM 8-step sampling (SPEC §10; issue "Performance").

Each variant runs in its own subprocess, so its peak RSS is its own; the variants run
one after the other in one invocation, so machine noise mostly cancels in the ratios.
The last line is one JSON object with medians:
{"dense_step_s", "projected_step_s", "torch_step_s", "dense_peak_mb", "projected_peak_mb",
 "fmlm_1step_samples_per_s", "torch_fmlm_1step_samples_per_s"}

python benchmarks/speed.py [--width narrow|small] [--batch 8] [--steps 3] [--only a,b] [--ce-chunk 256]

Throughputs: tokens/s = batch·L/step; samples/s = sequences of length L per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

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


def _median_seconds(fn, steps: int) -> float:
    from fmlm_jax.metrics import median_seconds  # lazily, as every JAX import of this script

    return median_seconds(fn, steps)


def run_jax_train(width: str, batch: int, steps: int, projected: bool, ce_chunk: int) -> dict:
    import jax
    import numpy as np

    from fmlm_jax import config as fmlm_config
    from fmlm_jax import train

    config = fmlm_config.defaults("flm")
    config.model = _model_config(width, False)
    config.flm.update(tau_min=0.0, tau_max=1.0, projected_noise=projected, ce_chunk_size=ce_chunk)
    config.train.update(lr=3e-4, warmup_steps=10, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                        grad_clip=1.0, ema_decay=0.9999)
    state = train.create_train_state(config, jax.random.key(0))
    step_fn = train.jit_train_step(config)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (batch, LENGTH)).astype(np.int32)
    batch_dict = {"tokens": jax.numpy.asarray(tokens)}
    rng = jax.random.key(1)
    carry = {"state": state}  # each step donates the previous state

    def step():
        carry["state"], metrics = step_fn(carry["state"], batch_dict, rng)
        jax.block_until_ready(metrics["loss"])

    step_s = _median_seconds(step, steps)
    return {"step_s": step_s, "tokens_per_s": batch * LENGTH / step_s, "peak_mb": _peak_mb()}


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

    step_s = _median_seconds(step, steps)
    return {"step_s": step_s, "tokens_per_s": batch * LENGTH / step_s, "peak_mb": _peak_mb()}


def run_jax_sample(width: str, batch: int, steps: int, kind: str, num_steps: int,
                   projected: bool) -> dict:
    """FMLM γ-sampler (kind 'fmlm', γ = 0) or FLM Euler sampler (kind 'flm')."""
    import jax

    from fmlm_jax.model import init_params
    from fmlm_jax.sampling import flm_sample, fmlm_sample

    cfg = _model_config(width, kind == "fmlm")
    params = init_params(cfg, jax.random.key(0))
    width_in = cfg.hidden_size if projected else VOCAB
    z0 = jax.random.normal(jax.random.key(1), (batch, LENGTH, width_in))
    if kind == "fmlm":
        fn = lambda: fmlm_sample(params, cfg, z0, num_steps, projected=projected)  # noqa: E731
    else:
        fn = lambda: flm_sample(params, cfg, z0, num_steps, projected=projected)  # noqa: E731
    return {"samples_per_s": batch / _median_seconds(lambda: jax.block_until_ready(fn()), steps),
            "peak_mb": _peak_mb()}


def run_torch_flm(width: str, batch: int, steps: int, num_steps: int) -> dict:
    """The FLM Euler sampler around the PyTorch module (the reference's loop, eager)."""
    import numpy as np
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torch_dit import TorchDiT

    from fmlm_jax.sampling import flm_time_grid

    hidden, blocks, heads, cond = WIDTHS[width]
    model = TorchDiT(VOCAB, hidden, cond, heads, blocks).eval()
    tau, t = (torch.tensor(np.asarray(a, np.float32)) for a in flm_time_grid(VOCAB, num_steps))
    z0 = torch.randn(batch, LENGTH, VOCAB)

    @torch.no_grad()
    def sample():
        z = z0
        for i in range(num_steps):
            logits = model(z, tau[i].expand(batch))
            d = torch.softmax(30 * torch.tanh(logits / 30), -1)
            if i == num_steps - 1:
                return d.argmax(-1)
            z = z + (t[i + 1] - t[i]) * (d - z) / (1 - t[i] + 1e-5)

    return {"samples_per_s": batch / _median_seconds(sample, steps), "peak_mb": _peak_mb()}


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

    return {"samples_per_s": batch / _median_seconds(sample, steps), "peak_mb": _peak_mb()}


VARIANTS = {
    "dense": lambda a: run_jax_train(a.width, a.batch, a.steps, False, a.ce_chunk),
    "projected": lambda a: run_jax_train(a.width, a.batch, a.steps, True, a.ce_chunk),
    "torch": lambda a: run_torch_train(a.width, a.batch, a.steps),
    "fmlm": lambda a: run_jax_sample(a.width, a.batch, a.steps, "fmlm", 1, projected=False),
    "fmlm_projected": lambda a: run_jax_sample(a.width, a.batch, a.steps, "fmlm", 1, projected=True),
    "torch_fmlm": lambda a: run_torch_fmlm(a.width, a.batch, a.steps),
    "flm8": lambda a: run_jax_sample(a.width, a.batch, a.steps, "flm", 8, projected=False),
    "flm8_projected": lambda a: run_jax_sample(a.width, a.batch, a.steps, "flm", 8, projected=True),
    "torch_flm8": lambda a: run_torch_flm(a.width, a.batch, a.steps, 8),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", choices=sorted(WIDTHS), default="narrow")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--ce-chunk", type=int, default=256,
                        help="flm.ce_chunk_size: tokens per chunk of the fused output cross-entropy")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: run one variant, print its JSON
        print(json.dumps(VARIANTS[args.variant](args)))
        return
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    results = {}
    for name in names:
        cmd = [sys.executable, __file__, "--variant", name, "--width", args.width,
               "--batch", str(args.batch), "--steps", str(args.steps), "--ce-chunk", str(args.ce_chunk)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            raise SystemExit(f"variant {name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:>15}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
    keys = {  # summary key → (variant, field)
        "dense_step_s": ("dense", "step_s"), "projected_step_s": ("projected", "step_s"),
        "torch_step_s": ("torch", "step_s"), "dense_peak_mb": ("dense", "peak_mb"),
        "projected_peak_mb": ("projected", "peak_mb"),
        "fmlm_1step_samples_per_s": ("fmlm", "samples_per_s"),
        "torch_fmlm_1step_samples_per_s": ("torch_fmlm", "samples_per_s"),
        "fmlm_projected_1step_samples_per_s": ("fmlm_projected", "samples_per_s"),
        "flm_8step_samples_per_s": ("flm8", "samples_per_s"),
        "flm_projected_8step_samples_per_s": ("flm8_projected", "samples_per_s"),
        "torch_flm_8step_samples_per_s": ("torch_flm8", "samples_per_s"),
        "torch_peak_mb": ("torch", "peak_mb"),
    }
    summary = {k: results[v][f] for k, (v, f) in keys.items() if v in results}

    def ratio(a, b):
        return f"{summary[a] / summary[b]:.2f}x" if a in summary and b in summary else "n/a"

    print(f"width={args.width} batch={args.batch} L={LENGTH} K={VOCAB}: dense/projected step "
          f"{ratio('dense_step_s', 'projected_step_s')}, torch/dense step "
          f"{ratio('torch_step_s', 'dense_step_s')}, FMLM 1-step jax/torch "
          f"{ratio('fmlm_1step_samples_per_s', 'torch_fmlm_1step_samples_per_s')}, FLM 8-step "
          f"jax/torch {ratio('flm_8step_samples_per_s', 'torch_flm_8step_samples_per_s')}", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
