"""FLOP and byte counts per step from the shapes alone (the GPU section of BENCHMARKS.md
until a device is measured): FLM train step dense vs projected, FMLM one-step sampling.

Counts matmul FLOPs (2 per multiply-add; backward = 2× forward for weights that need both
dX and dW) and the bytes the (B, L, K)-sized tensors and the parameters move at least
once each (float32 unless --bf16). Elementwise FLOPs are left out of the FLOP count (they
are bandwidth-bound); their traffic is in the bytes.

python benchmarks/flops.py            # DiT-small at OWT (L=1024, K=50258) and LM1B shapes
python benchmarks/flops.py --json     # one JSON object per shape
"""

from __future__ import annotations

import argparse
import json

# Peak dense bf16 tensor FLOP/s and HBM bytes/s (vendor data sheets, SXM parts).
DEVICES = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
TIME_FEATURES = 256  # sinusoidal time features into the TimestepEmbedder


def param_count(d: int, blocks: int, vocab: int, cond: int = 128, two_time: bool = False) -> int:
    """Parameters of the DiT (SPEC §3, §10): equals model.count_params (tested)."""
    embedder = TIME_FEATURES * cond + cond + cond * cond + cond
    block = 2 * d + 3 * d * d + d * d + (4 * d * d + 4 * d) + (4 * d * d + d) + (cond * 6 * d + 6 * d)
    final = d + (d * vocab + vocab) + (cond * 2 * d + 2 * d)
    return vocab * d + embedder * (2 if two_time else 1) + blocks * block + final


def forward_flops(batch: int, length: int, d: int, blocks: int, vocab: int, cond: int = 128,
                  dense_input: bool = True, two_time: bool = False) -> dict[str, float]:
    """Matmul FLOPs of one forward pass, by part."""
    tokens = batch * length
    embed = 2.0 * batch * (TIME_FEATURES * cond + cond * cond) * (2 if two_time else 1)
    ada = 2.0 * batch * cond * (6 * d * blocks + 2 * d)
    return {
        "input": 2.0 * tokens * vocab * d if dense_input else 0.0,  # z·E; a gather when projected
        "blocks_linear": 2.0 * tokens * blocks * 12 * d * d,  # qkv 3d², out d², MLP 8d²
        "attention": 2.0 * tokens * blocks * 2 * length * d,  # QKᵀ and AV
        "output": 2.0 * tokens * d * vocab,
        "time_and_adaln": embed + ada,
    }


def train_step(batch: int, length: int, d: int, blocks: int, vocab: int, projected: bool,
               param_bytes: int = 4, act_bytes: int = 4) -> dict[str, float]:
    """One FLM train step (forward + backward + AdamW + EMA): FLOPs and minimum bytes."""
    fwd = forward_flops(batch, length, d, blocks, vocab, dense_input=not projected)
    # Backward: 2× forward for every matmul with a learned weight and an input that needs
    # a gradient; the input product z·E needs only dE (z has no gradient): 1×.
    bwd = {k: (1.0 if k == "input" else 2.0) * v for k, v in fwd.items()}
    n_params = param_count(d, blocks, vocab)
    extra = 0.0
    if projected:  # Gram EᵀE, its backward, and ε̃·Cᵀ (SPEC §10)
        extra = 3 * 2.0 * vocab * d * d + 2.0 * 2 * batch * length * d * d
    flops = sum(fwd.values()) + sum(bwd.values()) + extra
    n = batch * length * vocab  # one (B, L, K) tensor
    # (B, L, K) traffic, each tensor written once and read once at least:
    # dense input: ε (RNG write, read), x_t (write, read in z·E fwd and in dE).
    input_bytes = 0 if projected else (2 + 3) * n * act_bytes
    # output: logits (write, read by the fused CE), recomputed in the backward (write, read)
    # and the logit gradient (write, read by dW and dX).
    output_bytes = 6 * n * act_bytes
    # parameters: read fwd + bwd, gradient write + read, AdamW m, v (read + write), EMA.
    param_traffic = n_params * (2 * param_bytes + 2 * 4 + 4 * 4 + 2 * 4 + 2 * 4)
    return {
        "flops": flops, "flops_by_part": {k: fwd[k] + bwd[k] for k in fwd}, "extra_flops": extra,
        "bytes": input_bytes + output_bytes + param_traffic,
        "bytes_vocab_tensors": input_bytes + output_bytes, "params": n_params,
        "peak_bytes_vocab_tensors": (2 if not projected else 0) * n * act_bytes + 2 * n * act_bytes,
    }


def fmlm_one_step(batch: int, length: int, d: int, blocks: int, vocab: int, projected: bool,
                  act_bytes: int = 4) -> dict[str, float]:
    """One network pass + argmax: FLOPs and the (B, L, K) bytes (z₀ read, logits write/read)."""
    fwd = forward_flops(batch, length, d, blocks, vocab, dense_input=not projected, two_time=True)
    n = batch * length * vocab
    return {"flops": sum(fwd.values()), "bytes_vocab_tensors": (0 if projected else 2) * n * act_bytes
            + 2 * n * act_bytes, "params": param_count(d, blocks, vocab, two_time=True)}


SHAPES = {  # name: (batch, length, d, blocks, vocab)
    "dit_small_owt": (32, 1024, 768, 12, 50258),
    "dit_small_lm1b": (512, 128, 768, 12, 30522),
}


def report(name: str, batch: int, length: int, d: int, blocks: int, vocab: int) -> dict:
    rows = {}
    for projected in (False, True):
        key = "projected" if projected else "dense"
        step = train_step(batch, length, d, blocks, vocab, projected)
        one = fmlm_one_step(1, length, d, blocks, vocab, projected)
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
            "vocab": vocab, "params": train_step(batch, length, d, blocks, vocab, False)["params"],
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
