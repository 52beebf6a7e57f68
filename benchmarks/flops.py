"""FLOP and byte counts per step from the shapes alone (the GPU section of BENCHMARKS.md
until a device is measured): FLM train step dense vs projected, FMLM one-step sampling.

The counts are fmlm_jax.metrics' (the same ones MFU uses): matmul FLOPs (2 per multiply-add;
backward = 2× forward for weights that need both dX and dW) and the bytes the (B, L, K)-sized
tensors and the parameters move at least once each (float32). Elementwise FLOPs are left out
of the FLOP count (they are bandwidth-bound); their traffic is in the bytes.

python benchmarks/flops.py            # DiT-small at OWT (L=1024, K=50258) and LM1B shapes
python benchmarks/flops.py --json     # one JSON object per shape
"""

from __future__ import annotations

import argparse
import json

from fmlm_jax import metrics

# Peak dense bf16 tensor FLOP/s and HBM bytes/s of the devices estimated (fmlm_jax.metrics).
DEVICES = {name.split()[-1]: (flops, bytes_per_s) for name, flops, bytes_per_s in metrics.DEVICE_PEAKS
           if name in ("NVIDIA H100", "NVIDIA H200")}


SHAPES = {  # name: (batch, length, d, blocks, vocab)
    "dit_small_owt": (32, 1024, 768, 12, 50258),
    "dit_small_lm1b": (512, 128, 768, 12, 30522),
}


def report(name: str, batch: int, length: int, d: int, blocks: int, vocab: int) -> dict:
    rows = {}
    for projected in (False, True):
        key = "projected" if projected else "dense"
        step = metrics.train_step_cost(batch, length, d, blocks, vocab, projected)
        one = metrics.fmlm_one_step_cost(1, length, d, blocks, vocab, projected)
        times = {dev: max(step["flops"] / peak, step["bytes"] / bw) for dev, (peak, bw) in DEVICES.items()}
        latency = {dev: max(one["flops"] / peak, (one["bytes_vocab_tensors"] + 2 * one["params"]) / bw)
                   for dev, (peak, bw) in DEVICES.items()}
        rows[key] = {
            "train_tflop_per_step": step["flops"] / 1e12,
            "train_gb_per_step": step["bytes"] / 1e9,
            "arithmetic_intensity": step["flops"] / step["bytes"],
            "input_share_of_flops": step["flops_by_part"]["input"] / step["flops"],
            "output_share_of_flops": step["flops_by_part"]["output"] / step["flops"],
            "roofline_step_s": times,
            "fmlm_1step_b1_gflop": one["flops"] / 1e9,
            "fmlm_1step_b1_roofline_ms": {k: 1e3 * v for k, v in latency.items()},
        }
    return {"shape": name, "batch": batch, "length": length, "d": d, "blocks": blocks,
            "vocab": vocab, "params": metrics.param_count(d, blocks, vocab),
            **rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for name, shape in SHAPES.items():
        r = report(name, *shape)
        if args.json:
            print(json.dumps(r))
            continue
        print(f"{name}: B={r['batch']} L={r['length']} d={r['d']} blocks={r['blocks']} "
              f"K={r['vocab']} params={r['params'] / 1e6:.2f}M")
        for key in ("dense", "projected"):
            x = r[key]
            print(f"  {key:>9}: train {x['train_tflop_per_step']:.1f} TFLOP, "
                  f"{x['train_gb_per_step']:.1f} GB/step (intensity {x['arithmetic_intensity']:.0f} "
                  f"FLOP/B; input {100 * x['input_share_of_flops']:.1f}%, output "
                  f"{100 * x['output_share_of_flops']:.1f}% of FLOPs); roofline step "
                  + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in x["roofline_step_s"].items())
                  + f"; FMLM 1-step B=1: {x['fmlm_1step_b1_gflop']:.0f} GFLOP, roofline "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in x["fmlm_1step_b1_roofline_ms"].items()))


if __name__ == "__main__":
    main()
