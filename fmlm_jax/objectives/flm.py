"""The FLM objective: denoiser cross-entropy at antithetic τ (SPEC §4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmlm_jax import interpolant
from fmlm_jax import model as model_lib
from fmlm_jax.schedule import Schedule

# Tokens per chunk of the fused output cross-entropy (`flm.ce_chunk_size` overrides): it
# bounds the (chunk, K) temporaries. On CPU small chunks suit the cache (256 vs one chunk
# of 1024 tokens: ~10% faster step, 175 MB less peak RSS, benchmarks/speed.py);
# accelerators want large matmuls, and 4096 × 50258 float32 is 0.8 GB. Same numerics.
# Per device: a chunk spans the whole (sharded) batch (`model.capped_nll`), so the default
# is this many tokens times the device count.
CE_CHUNK_SIZE = {"cpu": 256}


def default_ce_chunk_size() -> int:
    return CE_CHUNK_SIZE.get(jax.default_backend(), 4096) * jax.device_count()


def antithetic_uniform(rng: jax.Array, n: int) -> jax.Array:
    """n stratified uniforms (U_i + i)/n, one U_i ~ U(0, 1) per stratum as the reference
    draws them, randomly permuted (SPEC §4): every stratum [i/n, (i+1)/n) holds one."""
    k_offset, k_perm = jax.random.split(rng)
    u = jax.random.uniform(k_offset, (n,))
    return jax.random.permutation(k_perm, (u + jnp.arange(n)) / n)


def token_loss(params, model_config, nll: jax.Array, tau_s: jax.Array):
    """Per-token −log δ[x₁] (B, L) and its loss-weighted form e^{−w}·ℓ + w (SPEC §3.9)."""
    if not model_config.learnable_loss_weighting:
        return nll, nll
    w = model_lib.DiT(model_config).apply({"params": params}, tau_s, method=model_lib.DiT.loss_weight)
    w = w[:, None]
    return nll, jnp.exp(-w) * nll + w


def draw_plan(rng: jax.Array, n: int, config) -> dict:
    """Per-row randomness of a global batch of n rows: antithetic τ (n,) over the whole
    batch (SPEC §4) and one noise key per row (`interpolant.row_keys`). Gradient
    accumulation slices the plan, so every micro-batch shares the global stratification."""
    k_tau, k_noise = jax.random.split(rng)
    u = antithetic_uniform(k_tau, n)
    tau = config.flm.tau_min + (config.flm.tau_max - config.flm.tau_min) * u
    return {"tau": tau, "key": interpolant.row_keys(k_noise, n)}


def noise_width(config) -> int:
    """K for dense noise ε (B, L, K); d with `flm.projected_noise` (ε̃ (B, L, d), SPEC §10)."""
    return config.model.hidden_size if config.flm.get("projected_noise", False) else config.model.vocab_size


def loss_terms(params, batch: dict, plan: dict, rng: jax.Array, config, teacher_params=None,
               ema_params=None, train: bool = True) -> dict:
    """{name: (sum, count)} of the FLM loss over the rows of `batch`, given their `plan`
    (from `draw_plan`); `rng` is the dropout key. The metric is sum / count; the train step
    sums both over micro-batches before dividing (the teacher/EMA arguments are unused)."""
    del teacher_params, ema_params
    tokens = batch["tokens"]
    eps = interpolant.row_normal(plan["key"], (tokens.shape[1], noise_width(config)))
    nll, weighted = token_losses_at(params, tokens, plan["tau"], eps, rng, config.model, train,
                                    bool(config.flm.get("projected_noise", False)),
                                    config.flm.get("ce_chunk_size", None))
    mask = _mask(batch)
    count = mask.sum()
    return {"loss": ((weighted * mask).sum(), count), "nll": ((nll * mask).sum(), count)}


def finalize(terms: dict) -> dict:
    """Metrics from {name: (sum, count)}: sum / max(count, 1)."""
    return {k: total / jnp.maximum(count, 1.0) for k, (total, count) in terms.items()}


def flm_loss(params, batch: dict, rng: jax.Array, config, train: bool = True):
    """Mean FLM loss over the valid tokens of the (global) batch (SPEC §4): (loss, metrics).

    batch: {'tokens': (B, L) int32, optional 'mask': (B, L), 1 where the token counts}.
    config: needs `model` (a model config) and `flm.tau_min`, `flm.tau_max`; optional
    `flm.projected_noise` (default False) and `flm.ce_chunk_size` (default: per backend).
    Draws antithetic τ (B,) and ε (B, L, K) — or, with `flm.projected_noise`, ε̃ (B, L, d)
    for the projected input path of SPEC §10 — per row (`draw_plan`).
    """
    k_plan, k_dropout = jax.random.split(rng)
    plan = draw_plan(k_plan, batch["tokens"].shape[0], config)
    metrics = finalize(loss_terms(params, batch, plan, k_dropout, config, train=train))
    return metrics["loss"], metrics


def _mask(batch: dict) -> jax.Array:
    mask = batch.get("mask")
    return jnp.ones(batch["tokens"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


def token_losses_at(params, tokens, tau, eps, dropout_rng, model_config, train: bool = True,
                    projected: bool = False, ce_chunk_size: int | None = None):
    """Per-token (−log δ_τ(x_t)[x₁], its loss-weighted form), each (B, L), for given times
    τ (B,) and noise ε: (B, L, K) dense, or (B, L, d) with `projected` (SPEC §10)."""
    if ce_chunk_size is None:
        ce_chunk_size = default_ce_chunk_size()
    t = Schedule(model_config.vocab_size).tau_to_t(tau)
    if projected:
        net_input = interpolant.projected_noisy(tokens, t, eps, params["vocab_embed"]["embedding"])
    else:
        net_input = interpolant.noisy(tokens, t, eps)
    features = model_lib.DiT(model_config).apply(
        {"params": params}, net_input, tau, train=train, rngs={"dropout": dropout_rng},
        embedded=projected, features_only=True,
    )
    # −log δ[x₁] through the fused output cross-entropy: no (B, L, K) log-probs are kept.
    linear = params["output_layer"]["linear"]
    cfg = model_lib.resolve_config(model_config)
    nll = model_lib.capped_nll(features, linear["kernel"], linear["bias"], tokens, cfg.output_cap,
                               ce_chunk_size, jnp.dtype(cfg.dtype))
    return token_loss(params, model_config, nll, tau)


def flm_loss_at(params, tokens, mask, tau, eps, dropout_rng, model_config, train: bool = True,
                projected: bool = False, ce_chunk_size: int | None = None):
    """The FLM loss for given times τ (B,) and noise ε (B, L, K): −log δ_τ(x_t)[x₁].

    x_t = (1 − t)·ε + t·onehot(x₁) with t = T(τ); the network sees τ. With `projected`,
    ε is (B, L, d) and the network gets h_t = x_t·E drawn in projected form (SPEC §10).
    ce_chunk_size: tokens per chunk of the fused output cross-entropy (0: one chunk;
    None: `default_ce_chunk_size()`). Returns (loss, metrics).
    """
    nll, weighted = token_losses_at(params, tokens, tau, eps, dropout_rng, model_config, train,
                                    projected, ce_chunk_size)
    mask = _mask({"tokens": tokens, "mask": mask})
    metrics = finalize({"loss": ((weighted * mask).sum(), mask.sum()),
                        "nll": ((nll * mask).sum(), mask.sum())})
    return metrics["loss"], metrics
