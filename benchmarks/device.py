"""One prepared accelerator benchmark (issue #16): ≤ 5 minutes on one GPU or TPU, unattended.

Measures, for `model.attention_impl` 'xla' (our einsum) against the platform's fused kernel
(tokamax: 'mosaic' on TPU, 'triton' on GPU — or 'mosaic' on Hopper/Blackwell with --impls —,
'xla_chunked' elsewhere; tokamax's 'cudnn' refuses the logit softcap) and for dense
against projected noise (SPEC §10):
  - kernel parity: max |error| of the attention output and its gradient vs 'xla', float32;
  - the FLM train step at the OWT (L 1024, K 50258) and LM1B (L 128, K 30522) shapes, bf16,
    DiT-small: seconds, tokens/s, MFU (model FLOPs of `fmlm_jax.metrics`, peak of
    `metrics.DEVICE_PEAKS`);
  - the PSD distillation step at the OWT shape (loss chunked over tokens);
  - FMLM one-step sampling at the LM1B shape: latency at batch 1, throughput at batch 256;
  - FLM 1024-step Euler sampling throughput at the LM1B shape;
and writes `results.json` (rewritten after every item, so a run cut short keeps what it
measured), `compiled.json` (XLA's cost and memory analysis of each compiled step: the
profile summary) and a profiler trace of one OWT FLM step (`trace/`, TensorBoard/Perfetto).

python benchmarks/device.py --out DIR [--tiny] [--budget-s 280] [--impls xla,triton] [--only PREFIXES]

--tiny: a few-thousand-parameter model at L 16, K 64: every item in seconds on CPU (the test).
--only: comma-separated prefixes of the item names to run (e.g. parity,flm_step_owt).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fmlm_jax import config as fmlm_config  # noqa: E402
from fmlm_jax import kernels, metrics, sampling, train  # noqa: E402
from fmlm_jax import model as model_lib  # noqa: E402
from fmlm_jax.model import softcap_attention  # noqa: E402
from fmlm_jax.objectives.distill import teacher_config  # noqa: E402

# name: (L, K, per-device batch) of the paper's two datasets; tiny: a CPU-sized stand-in.
SHAPES = {"owt": (1024, 50258, 16), "lm1b": (128, 30522, 64)}
TINY_SHAPES = {"owt": (16, 64, 2), "lm1b": (8, 48, 2)}
KERNEL_BY_PLATFORM = {"tpu": ("mosaic",), "gpu": ("triton", "mosaic"), "cpu": ("xla_chunked",)}


def model_group(size_kw: dict, vocab: int, two_time: bool, attention: str):
    group = fmlm_config.model_group("small", vocab, two_time=two_time, dtype="bfloat16",
                                    attention_impl=attention, dropout=0.1)
    group.update(size_kw)
    return group


def run_config(mode: str, shape, size_kw: dict, attention: str, projected: bool, method: str = "psd"):
    length, vocab, batch = shape
    config = fmlm_config.defaults(mode)
    config.model = model_group(size_kw, vocab, mode == "fmlm", attention)
    config.data.update(seq_len=length, batch_size=batch)
    config.flm.projected_noise = projected
    config.train.warmup_steps = 1
    if mode == "fmlm":
        config.distill.method = method
    return fmlm_config.validate(config)


def compiled_summary(compiled) -> dict:
    """XLA's own view of a compiled step: FLOPs and bytes accessed, peak buffers."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per module
    mem = compiled.memory_analysis()
    out = {k: float(cost[k]) for k in ("flops", "bytes accessed", "transcendentals") if k in (cost or {})}
    if mem is not None:
        out["peak_bytes"] = float(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                  - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.results = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
                        "tiny": args.tiny, "jax": jax.__version__, "skipped": []}
        self.compiled = {}
        self.peak = metrics.device_peak(self.results["device"])
        os.makedirs(args.out, exist_ok=True)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        for name, data in (("results.json", self.results), ("compiled.json", self.compiled)):
            with open(os.path.join(self.args.out, name + ".tmp"), "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(os.path.join(self.args.out, name + ".tmp"), os.path.join(self.args.out, name))

    def item(self, name: str, fn) -> None:
        """Runs one measurement unless the budget is spent; an error is recorded, not raised."""
        if self.args.only and not name.startswith(tuple(self.args.only.split(","))):
            return
        if self.left() <= 0:
            self.results["skipped"].append(name)
            return
        try:
            self.results[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failing item must not lose the others
            self.results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"[{time.perf_counter() - self.start:6.1f} s] {name}: {self.results[name]}", flush=True)
        self.save()


def parity(impl: str) -> dict:
    """Max |error| of `impl` vs 'xla' attention, float32, output and (q, k, v) gradients."""
    keys = jax.random.split(jax.random.key(0), 4)
    q, k = (3.0 * jax.random.normal(key, (2, 256, 4, 64)) for key in keys[:2])
    v, g = (jax.random.normal(key, (2, 256, 4, 64)) for key in keys[2:])

    def fn(i):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(softcap_attention(q, k, v, 50.0, i) * g),
                                          argnums=(0, 1, 2)))

    out_x = jax.jit(functools.partial(softcap_attention, softcap=50.0))(q, k, v)
    out_k = jax.jit(functools.partial(softcap_attention, softcap=50.0, impl=impl))(q, k, v)
    (_, gx), (_, gk) = fn("xla")(q, k, v), fn(impl)(q, k, v)
    return {"forward_max_abs": float(jnp.max(jnp.abs(out_x - out_k))),
            "grad_max_abs": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(gx, gk, strict=True))}


def step_item(bench: Bench, config, name: str, teacher: bool = False):
    """Seconds, tokens/s and MFU of one train step of `config` (fresh state, fixed batch)."""
    def run():
        state = train.create_train_state(config, jax.random.key(0))
        length, batch = config.data.seq_len, config.data.batch_size
        tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, config.model.vocab_size)
        args = [{"tokens": tokens}, jax.random.key(2)]
        if teacher:
            args.append(model_lib.init_params(teacher_config(config.model), jax.random.key(3)))
            step = jax.jit(lambda s, b, r, t: train.train_step(s, b, r, config, teacher_params=t),
                           donate_argnums=0)
        else:
            step = jax.jit(lambda s, b, r: train.train_step(s, b, r, config), donate_argnums=0)
        compiled = step.lower(state, *args).compile()
        bench.compiled[name] = compiled_summary(compiled)
        box = [state]

        def once():
            box[0], m = compiled(box[0], *args)
            jax.block_until_ready(m["loss"])

        seconds = metrics.median_seconds(once, bench.args.steps)
        out = {"step_s": seconds, "tokens_per_s": batch * length / seconds}
        if config.mode == "flm":
            flops = metrics.train_step_cost(batch, length, projected=bool(config.flm.projected_noise),
                                            **metrics.model_shape(config.model))["flops"]
            out["model_tflops_per_step"] = flops / 1e12
            out["mfu"] = metrics.mfu(flops / seconds, bench.peak, 1)
        if name == bench.trace_name and not bench.args.no_trace:
            with jax.profiler.trace(os.path.join(bench.args.out, "trace")):
                once()
        return out
    return run


def sample_item(bench: Bench, model_cfg, batch: int, length: int, steps: int, projected: bool,
                repeats: int | None = None):
    def run():
        params = model_lib.init_params(model_cfg, jax.random.key(0))
        z0 = sampling.initial_noise(jax.random.key(1), batch, length, model_cfg, projected)
        fn = jax.jit(lambda p, z: sampling.generate(p, model_cfg, z, steps, projected=projected))
        seconds = metrics.median_seconds(lambda: jax.block_until_ready(fn(params, z0)),
                                         repeats or bench.args.steps)
        return {"seconds": seconds, "samples_per_s": batch / seconds, "batch": batch, "steps": steps}
    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for results.json, compiled.json, trace/")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model and shapes (seconds)")
    parser.add_argument("--budget-s", type=float, default=280.0, help="stop starting items after this")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions per item (after compiling)")
    parser.add_argument("--impls", default="", help="attention implementations (default: xla + the kernel)")
    parser.add_argument("--no-trace", action="store_true", help="skip the profiler trace")
    parser.add_argument("--only", default="", help="comma-separated prefixes of the items to run")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps = min(args.steps, 2)
    bench = Bench(args)
    platform = jax.default_backend()
    available = kernels.available()
    kernel = next((i for i in KERNEL_BY_PLATFORM.get(platform, ()) if i in available), None)
    impls = [i for i in args.impls.split(",") if i] or ["xla"] + ([kernel] if kernel else [])
    bench.results["attention_impls"] = impls
    if kernel is None:
        bench.results["skipped"].append("kernel: tokamax not installed (pip install fmlm-jax[kernels])")
    shapes = TINY_SHAPES if args.tiny else SHAPES
    size_kw = (dict(hidden_size=32, n_blocks=1, n_heads=2, cond_dim=16) if args.tiny
               else fmlm_config.model_size("small"))
    sample_steps = 8 if args.tiny else 1024
    big_batch = 4 if args.tiny else 256
    bench.trace_name = f"flm_step_owt_{impls[0]}_dense"

    for impl in impls:
        if impl != "xla":
            bench.item(f"parity_{impl}", lambda impl=impl: parity(impl))
    # The headline items first (the budget may end the run): FLM step at both shapes.
    for shape in ("owt", "lm1b"):
        for impl in impls:
            for projected in (False, True):
                name = f"flm_step_{shape}_{impl}_{'projected' if projected else 'dense'}"
                config = run_config("flm", shapes[shape], size_kw, impl, projected)
                bench.item(name, step_item(bench, config, name))
    for impl in impls:
        config = run_config("fmlm", shapes["owt"], size_kw, impl, False)
        bench.item(f"psd_step_owt_{impl}_dense", step_item(bench, config, f"psd_step_owt_{impl}_dense",
                                                             teacher=True))
    length, vocab, _ = shapes["lm1b"]
    for impl in impls:
        for projected in (False, True):
            kind = "projected" if projected else "dense"
            fmlm_cfg = model_group(size_kw, vocab, True, impl)
            flm_cfg = model_group(size_kw, vocab, False, impl)
            bench.item(f"fmlm_1step_lm1b_b1_{impl}_{kind}",
                       sample_item(bench, fmlm_cfg, 1, length, 1, projected))
            bench.item(f"fmlm_1step_lm1b_b{big_batch}_{impl}_{kind}",
                       sample_item(bench, fmlm_cfg, big_batch, length, 1, projected))
            bench.item(f"flm_{sample_steps}step_lm1b_b{big_batch // 4}_{impl}_{kind}",
                       sample_item(bench, flm_cfg, big_batch // 4, length, sample_steps, projected,
                                   repeats=1))  # 1024 network passes: one timed run
    bench.save()
    print(json.dumps({k: v for k, v in bench.results.items() if not isinstance(v, dict)}))
    return bench.results


if __name__ == "__main__":
    main()
