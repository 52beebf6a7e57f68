"""What a run reports and how it is counted: metric writers, FLOP and byte counts, device peaks.

    writer = MetricWriter(workdir)              # clu (TensorBoard + console) + WORKDIR/metrics.jsonl
    writer.scalars(step, {"train/loss": ...}); writer.texts(step, texts); writer.close()
    mfu(train_flops(model_config, seq_len, projected) * tokens_per_s / seq_len, device_peak(...), n)

FLOPs are matmul FLOPs from shapes (2 per multiply-add; the backward pass is 2× the forward
for every product with a learned weight and an input that needs a gradient, 1× for the
input product z·E, whose only gradient is dE). Elementwise work is left out (it is
bandwidth-bound); its traffic is in the byte counts. benchmarks/ imports these counts;
tests compare them with XLA's own count of the compiled step.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax

TIME_FEATURES = 256  # sinusoidal time features into the TimestepEmbedder (SPEC §3.2)

# Dense bf16 peak FLOP/s and HBM bytes/s per device, by `device_kind` prefix (vendor data
# sheets; SXM parts). Bytes/s only where the roofline estimates use it.
DEVICE_PEAKS = (
    ("NVIDIA H200", 989e12, 4.8e12), ("NVIDIA H100", 989e12, 3.35e12), ("NVIDIA A100", 312e12, 2.0e12),
    ("TPU v6", 918e12, 1.64e12), ("TPU v5p", 459e12, 2.76e12), ("TPU v5 lite", 197e12, 0.82e12),
    ("TPU v5e", 197e12, 0.82e12), ("TPU v4", 275e12, 1.2e12),
)


def device_peak(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Dense bf16 peak FLOP/s of a device kind (None when unknown, e.g. CPU); a positive
    `override_tflops` (config `train.peak_tflops`) wins."""
    if override_tflops:
        return float(override_tflops) * 1e12
    return next((flops for prefix, flops, _ in DEVICE_PEAKS if device_kind.startswith(prefix)), None)


def param_count(d: int, blocks: int, vocab: int, cond: int = 128, two_time: bool = False,
                mlp_ratio: int = 4) -> int:
    """Parameters of the DiT (SPEC §3) from its shape (equals model.count_params: tested)."""
    embedder = TIME_FEATURES * cond + cond + cond * cond + cond
    block = (2 * d + 3 * d * d + d * d + (mlp_ratio * d * d + mlp_ratio * d) + (mlp_ratio * d * d + d)
             + (cond * 6 * d + 6 * d))
    final = d + (d * vocab + vocab) + (cond * 2 * d + 2 * d)
    return vocab * d + embedder * (2 if two_time else 1) + blocks * block + final


def forward_flops(batch: int, length: int, d: int, blocks: int, vocab: int, cond: int = 128,
                  dense_input: bool = True, two_time: bool = False, mlp_ratio: int = 4) -> dict[str, float]:
    """Matmul FLOPs of one forward pass of a (batch, length) input, by part."""
    tokens = batch * length
    return {
        "input": 2.0 * tokens * vocab * d if dense_input else 0.0,  # z·E; a gather when projected
        "blocks_linear": 2.0 * tokens * blocks * (4 + 2 * mlp_ratio) * d * d,  # qkv 3d², out d², MLP
        "attention": 2.0 * tokens * blocks * 2 * length * d,  # QKᵀ and AV
        "output": 2.0 * tokens * d * vocab,
        "time_and_adaln": 2.0 * batch * ((TIME_FEATURES * cond + cond * cond) * (2 if two_time else 1)
                                         + cond * (6 * d * blocks + 2 * d)),
    }


def model_shape(model_config) -> dict:
    """The keyword arguments of the counts above for a model config."""
    return dict(d=model_config.hidden_size, blocks=model_config.n_blocks, vocab=model_config.vocab_size,
                cond=model_config.cond_dim, two_time=bool(model_config.two_time),
                mlp_ratio=int(model_config.get("mlp_ratio", 4)))


def train_step_cost(batch: int, length: int, d: int, blocks: int, vocab: int, projected: bool,
                    cond: int = 128, two_time: bool = False, mlp_ratio: int = 4, param_bytes: int = 4,
                    act_bytes: int = 4) -> dict:
    """One FLM train step (forward + backward + AdamW + EMA): model FLOPs (`flops`, what MFU
    counts), the projected path's extra work (`extra_flops`: the Gram EᵀE and its backward,
    ε̃·Cᵀ; SPEC §10) and the minimum bytes moved."""
    shape = dict(cond=cond, two_time=two_time, mlp_ratio=mlp_ratio)
    fwd = forward_flops(batch, length, d, blocks, vocab, dense_input=not projected, **shape)
    bwd = {k: (1.0 if k == "input" else 2.0) * v for k, v in fwd.items()}
    n_params = param_count(d, blocks, vocab, **shape)
    extra = 3 * 2.0 * vocab * d * d + 2.0 * 2 * batch * length * d * d if projected else 0.0
    n = batch * length * vocab  # one (B, L, K) tensor
    # dense input: ε (RNG write, read), x_t (write, read in z·E fwd and in dE).
    input_bytes = 0 if projected else (2 + 3) * n * act_bytes
    # output: logits (write, read by the fused CE), recomputed in the backward (write, read),
    # and the logit gradient (write, read by dW and dX).
    output_bytes = 6 * n * act_bytes
    # parameters: read fwd + bwd, gradient write + read, AdamW m, v (read + write), EMA.
    param_traffic = n_params * (2 * param_bytes + 2 * 4 + 4 * 4 + 2 * 4 + 2 * 4)
    return {
        "flops": sum(fwd.values()) + sum(bwd.values()), "flops_by_part": {k: fwd[k] + bwd[k] for k in fwd},
        "extra_flops": extra, "bytes": input_bytes + output_bytes + param_traffic,
        "bytes_vocab_tensors": input_bytes + output_bytes, "params": n_params,
        "peak_bytes_vocab_tensors": (0 if projected else 2) * n * act_bytes + 2 * n * act_bytes,
    }


def fmlm_one_step_cost(batch: int, length: int, d: int, blocks: int, vocab: int, projected: bool,
                       cond: int = 128, act_bytes: int = 4) -> dict:
    """One two-time network pass + argmax: FLOPs and the (B, L, K) bytes (z₀ read, logits write/read)."""
    fwd = forward_flops(batch, length, d, blocks, vocab, cond, dense_input=not projected, two_time=True)
    n = batch * length * vocab
    return {"flops": sum(fwd.values()),
            "bytes_vocab_tensors": (0 if projected else 2) * n * act_bytes + 2 * n * act_bytes,
            "params": param_count(d, blocks, vocab, cond, two_time=True)}


def flm_train_flops_per_token(model_config, seq_len: int, projected: bool) -> float:
    """Model FLOPs of one FLM training token (the numerator of MFU)."""
    return train_step_cost(1, seq_len, projected=projected, **model_shape(model_config))["flops"] / seq_len


def mfu(flops_per_s: float, peak_per_device: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak (None if unknown)."""
    return None if not peak_per_device else flops_per_s / (peak_per_device * devices)


def median_seconds(fn, steps: int) -> float:
    """Median wall seconds of fn() over `steps` calls after one warm-up (compiling) call, for
    the benchmarks; fn must finish its work before returning (block on JAX results)."""
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ============================================================================ writers


def is_local(workdir: str) -> bool:
    return "://" not in workdir


class MetricWriter:
    """clu's default writer (TensorBoard event files + console), plus JSON lines beside the
    checkpoints (WORKDIR/metrics.jsonl, WORKDIR/samples.jsonl) so that results can be read
    without TensorFlow. Only process 0 writes files; gs:// workdirs get TensorBoard only."""

    def __init__(self, workdir: str):
        from clu import metric_writers  # TensorFlow comes with it: imported only by the loop

        self.workdir = workdir
        self.main = jax.process_index() == 0
        self._writer = metric_writers.create_default_writer(workdir, just_logging=not self.main)

    def _append(self, name: str, row: dict) -> None:
        if self.main and is_local(self.workdir):
            with open(os.path.join(self.workdir, name), "a") as f:
                f.write(json.dumps(row) + "\n")

    def scalars(self, step: int, values: dict) -> None:
        self._writer.write_scalars(step, values)
        self._append("metrics.jsonl", {"step": step, **values})

    def texts(self, step: int, texts: list[str]) -> None:
        self._writer.write_texts(step, {"samples": "\n\n".join(texts)})
        self._append("samples.jsonl", {"step": step, "texts": texts})

    def report_progress(self, num_steps: int, every_steps: int):
        """clu's ReportProgress on this writer (steps/s, ETA, timed sections)."""
        from clu import periodic_actions

        return periodic_actions.ReportProgress(num_train_steps=num_steps, writer=self._writer,
                                               every_steps=every_steps, every_secs=None)

    def close(self) -> None:
        self._writer.flush()
