"""Peak device memory of one train step at the OWT shape, from XLA's compiled memory analysis.

Nothing runs: each step is lowered with abstract inputs (jax.ShapeDtypeStruct) and compiled
for this machine's backend, and `compiled.memory_analysis()` gives its buffers. Peak bytes
per device = arguments + outputs − aliased (the donated state) + temporaries. On CPU the
XLA buffer assignment is not a GPU's, but it keeps the same tensors live; the figures compare
variants, they are not an allocator trace.

Shape (issue #16): OWT, L = 1024, K = 50258, DiT-small, bf16 compute, float32 weights and
optimizer state, per-device batch 16, one device (FSDP would divide the 3.4 GB of state).
Rows: the PSD step before (distill.chunk_size=0: every (B, L, K) tensor at once) and after
(chunks of 1024 tokens), PSD after with fused attention (tokamax 'xla_chunked', the memory
profile of the flash kernels: no (B, H, L, L) scores kept), LSD, ESD, and the FLM step dense
and projected (SPEC §10). Max batch in 80 GB: peak(B) = fixed + slope·B, the fixed part the
step's arguments and outputs less the aliased (donated) state — state, teacher and batch —
and the slope (peak − fixed)/B from the row's own compile: every temporary counts as growing
with the batch (gradients too), so the max batch is a lower bound (`--verify` compiles PSD at
it). The '*_kernel' rows (tokamax 'xla_chunked' attention, whose memory profile is the fused
kernels': no (B, H, L, L) scores kept for the backward pass) are optional: --rows.

python benchmarks/memory.py [--batch 16] [--chunk 1024] [--rows psd_before,psd,...] [--verify] [--tiny]

--tiny: a one-block model at L 32, K 512 (seconds; the test of tests/test_benchmarks.py).

The last line is one JSON object: {"owt_psd_peak_gb", "owt_psd_max_batch_80gb",
"owt_psd_peak_gb_before", "owt_flm_peak_gb", "owt_lsd_peak_gb", "owt_esd_peak_gb", ...}.
"""

from __future__ import annotations

import os

# Memory analysis needs XLA's buffer assignment, not fast machine code: skip LLVM's
# optimisations (compiles ~2× faster, the same buffers). Before jax is imported.
os.environ.setdefault("XLA_FLAGS",
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fmlm_jax import config as fmlm_config  # noqa: E402
from fmlm_jax import kernels, train  # noqa: E402
from fmlm_jax import model as model_lib  # noqa: E402
from fmlm_jax.objectives.distill import teacher_config  # noqa: E402

VOCAB, LENGTH, BUDGET_GB = 50258, 1024, 80.0
TINY = dict(vocab=512, length=32, size=dict(hidden_size=32, n_blocks=1, n_heads=2, cond_dim=16))
GB = 1e9
DEFAULT_ROWS = ("psd_before", "psd", "lsd", "esd", "flm_dense", "flm_projected")
# name: (mode, distill method, distill chunk (None = --chunk), attention, projected noise)
ROWS = {
    "psd_before": ("fmlm", "psd", 0, "xla", False),
    "psd": ("fmlm", "psd", None, "xla", False),
    "psd_kernel": ("fmlm", "psd", None, "xla_chunked", False),
    "lsd_kernel": ("fmlm", "lsd", None, "xla_chunked", False),
    "esd_kernel": ("fmlm", "esd", None, "xla_chunked", False),
    "flm_kernel": ("flm", None, None, "xla_chunked", False),
    "lsd": ("fmlm", "lsd", None, "xla", False),
    "esd": ("fmlm", "esd", None, "xla", False),
    "flm_dense": ("flm", None, None, "xla", False),
    "flm_projected": ("flm", None, None, "xla", True),
}


def owt_config(mode: str, batch: int, method: str | None, chunk: int, attention: str, projected: bool,
               tiny: bool = False):
    """The run config of one row at the OWT shape (or the --tiny stand-in)."""
    config = fmlm_config.defaults(mode)
    size = TINY["size"] if tiny else fmlm_config.model_size("small")
    config.model.update(size, vocab_size=TINY["vocab"] if tiny else VOCAB, dtype="bfloat16",
                        attention_impl=attention)
    config.data.update(seq_len=TINY["length"] if tiny else LENGTH, batch_size=batch)
    config.flm.projected_noise = projected
    config.flm.ce_chunk_size = 4096  # the accelerator default per device (flm.default_ce_chunk_size)
    if method is not None:
        config.distill.update(method=method, chunk_size=chunk)
    return fmlm_config.validate(config)


def step_peak(config) -> tuple[float, float, float]:
    """(peak bytes per device, fixed bytes, compile seconds) of one train step of `config`:
    peak = arguments + outputs − aliased + temporaries; fixed = arguments + outputs − aliased."""
    start = time.perf_counter()
    state = train.train_state_shapes(config)
    batch = {"tokens": jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32)}
    rng = jax.random.key(0)
    if config.mode == "fmlm" and config.distill.use_teacher:
        teacher = model_lib.param_shapes(teacher_config(config.model))

        def step(s, b, r, t):
            return train.train_step(s, b, r, config, teacher_params=t)
        args = (state, batch, rng, teacher)
    else:
        def step(s, b, r):
            return train.train_step(s, b, r, config)
        args = (state, batch, rng)
    stats = jax.jit(step, donate_argnums=0).lower(*args).compile().memory_analysis()
    fixed = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    return float(fixed + stats.temp_size_in_bytes), float(fixed), time.perf_counter() - start


def max_batch(peak: float, batch: int, fixed: float, budget: float = BUDGET_GB * GB) -> int:
    """The largest B with fixed + slope·B ≤ budget, slope = (peak − fixed)/batch."""
    slope = (peak - fixed) / batch
    return max(0, math.floor((budget - fixed) / slope))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="per-device batch")
    parser.add_argument("--chunk", type=int, default=1024, help="distill.chunk_size of the 'after' rows")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"a subset of {list(ROWS)}")
    parser.add_argument("--verify", action="store_true",
                        help="also compile PSD at its predicted max batch (one more compile)")
    parser.add_argument("--tiny", action="store_true", help="a small model at L 32, K 512 (seconds)")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if "xla_chunked" not in kernels.available():
        for name in [r for r in rows if ROWS[r][3] != "xla"]:
            print(f"{name} skipped: needs tokamax (pip install fmlm-jax[kernels])")
            rows.remove(name)
    length, vocab = (TINY["length"], TINY["vocab"]) if args.tiny else (LENGTH, VOCAB)
    print(f"{'tiny' if args.tiny else 'OWT'} shape: L={length}, K={vocab}, "
          f"{'tiny DiT' if args.tiny else 'DiT-small'}, bf16, per-device batch {args.batch}, "
          f"backend {jax.default_backend()}; distill chunk {args.chunk} tokens", flush=True)

    results = {}
    for name in rows:
        mode, method, chunk, attention, projected = ROWS[name]
        config = owt_config(mode, args.batch, method, args.chunk if chunk is None else chunk, attention,
                            projected, args.tiny)
        peak, fixed, seconds = step_peak(config)
        results[name] = (peak, fixed)
        print(f"  compiled {name:14s} in {seconds:5.1f} s", flush=True)

    print(f"\n{'step':16s} {'attention':12s} {'loss chunk':>10s} {'peak GB/device':>15s} "
          f"{'fixed GB':>9s} {'max batch in 80 GB':>19s}")
    table = {}
    for name, (peak, fixed) in results.items():
        mode, method, chunk, attention, projected = ROWS[name]
        chunk = args.chunk if chunk is None else chunk
        best = max_batch(peak, args.batch, fixed)
        table[name] = (peak / GB, best)
        kind = (f"FMLM {method.upper()}" if mode == "fmlm" else "FLM") + (" proj." if projected else "")
        loss_chunk = "—" if mode == "flm" else (str(chunk) if chunk else "none")
        print(f"{kind:16s} {attention:12s} {loss_chunk:>10s} {peak / GB:15.2f} {fixed / GB:9.2f} {best:19d}")
    print("(fixed: state, teacher, batch; max batch = (80 GB − fixed)/slope, every temporary counted as "
          "growing with the batch: a lower bound)")

    def peak_gb(name):
        return round(table[name][0], 3) if name in table else None

    def best_batch(name):
        return table[name][1] if name in table else None

    out = {
        "owt_psd_peak_gb": peak_gb("psd"),
        "owt_psd_max_batch_80gb": best_batch("psd"),
        "owt_psd_peak_gb_before": peak_gb("psd_before"),
        "owt_flm_peak_gb": peak_gb("flm_dense"),
        "owt_lsd_peak_gb": peak_gb("lsd"),
        "owt_esd_peak_gb": peak_gb("esd"),
        "owt_psd_max_batch_80gb_before": best_batch("psd_before"),
        "owt_lsd_max_batch_80gb": best_batch("lsd"),
        "owt_esd_max_batch_80gb": best_batch("esd"),
        "owt_flm_max_batch_80gb": best_batch("flm_dense"),
        "owt_flm_projected_peak_gb": peak_gb("flm_projected"),
        "owt_flm_projected_max_batch_80gb": best_batch("flm_projected"),
        **{f"owt_{name}_peak_gb": peak_gb(name) for name in ("psd_kernel", "lsd_kernel", "esd_kernel",
                                                              "flm_kernel")},
        **{f"owt_{name}_max_batch_80gb": best_batch(name) for name in ("psd_kernel", "lsd_kernel",
                                                                       "esd_kernel", "flm_kernel")},
        "batch": args.batch, "chunk": args.chunk, "backend": jax.default_backend(), "tiny": args.tiny,
        "peak_bytes": {name: peak for name, (peak, _) in results.items()},
    }
    if args.verify and "psd" in table:
        best = table["psd"][1]
        peak, _, _ = step_peak(owt_config("fmlm", best, "psd", args.chunk, "xla", False, args.tiny))
        print(f"verify: PSD at batch {best}: {peak / GB:.1f} GB")
        out["owt_psd_peak_gb_at_max_batch"] = round(peak / GB, 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
