"""fmlm_jax.metrics: FLOP counts from shapes against XLA's own count, the parameter count,
MFU and device peaks, and the metric writers' JSON lines."""

import json

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_model_config

from fmlm_jax import metrics, model


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("two_time", [False, True])
def test_parameter_count_from_shapes_is_the_models(two_time):
    cfg = model.model_config("tiny", 512, hidden_size=64, n_blocks=2, n_heads=4, dropout=0.0,
                             two_time=two_time)
    counted = metrics.param_count(**{k: v for k, v in metrics.model_shape(cfg).items()})
    assert counted == model.count_params(model.param_shapes(cfg))


def test_flop_counts_match_xla_for_forward_and_gradient():
    # The analytic model FLOPs (the MFU numerator and the benchmarks' counts) against XLA's
    # own count of the compiled forward pass and of the gradient, at a size where matmuls
    # dominate (elementwise work adds a few %).
    cfg = model.model_config("tiny", 2048, hidden_size=128, cond_dim=32, n_blocks=2, n_heads=4, dropout=0.0)
    batch, length = 2, 64
    params = model.param_shapes(cfg)
    z = jax.ShapeDtypeStruct((batch, length, cfg.vocab_size), jnp.float32)
    tau = jax.ShapeDtypeStruct((batch,), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def forward(p, z, t):
        return model.DiT(cfg).apply({"params": p}, z, t)

    def loss(p, z, t, tokens):
        log_p = jax.nn.log_softmax(forward(p, z, t))
        return -jnp.take_along_axis(log_p, tokens[..., None], -1).mean()

    shape = metrics.model_shape(cfg)
    analytic_forward = sum(metrics.forward_flops(batch, length, dense_input=True, **shape).values())
    assert _xla_flops(forward, params, z, tau) == pytest.approx(analytic_forward, rel=0.1)
    analytic_step = metrics.flm_train_flops_per_token(cfg, length, projected=False) * batch * length
    assert _xla_flops(jax.grad(loss), params, z, tau, tokens) == pytest.approx(analytic_step, rel=0.1)
    # The projected path drops the input product and its backward (a gather instead).
    parts = metrics.train_step_cost(batch, length, projected=True, **shape)["flops_by_part"]
    assert parts["input"] == 0.0


def test_mfu_by_hand_and_device_peaks():
    cfg = tiny_model_config()
    per_token = metrics.flm_train_flops_per_token(cfg, 8, projected=False)
    # 6·N-style count by hand for this tiny model: forward matmuls per token, ×3 (backward 2×)
    # except the input product (×2: forward and dE only).
    d, k, n, L = cfg.hidden_size, cfg.vocab_size, cfg.n_blocks, 8
    forward = 2 * k * d + 2 * n * 12 * d * d + 2 * n * 2 * L * d + 2 * d * k
    time_adaln = 2 * ((256 * cfg.cond_dim + cfg.cond_dim ** 2) + cfg.cond_dim * (6 * d * n + 2 * d)) / L
    assert per_token == pytest.approx(3 * forward - 2 * k * d + 3 * time_adaln)
    assert metrics.mfu(500e12, 1000e12, 1) == pytest.approx(0.5)
    assert metrics.mfu(1e12, None, 1) is None
    assert metrics.device_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.device_peak("cpu") is None and metrics.device_peak("cpu", 2.0) == 2e12


def test_writer_appends_json_lines(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.scalars(3, {"train/loss": 1.5})
    writer.texts(3, ["a sample"])
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "train/loss": 1.5}
    assert json.loads((tmp_path / "samples.jsonl").read_text()) == {"step": 3, "texts": ["a sample"]}
