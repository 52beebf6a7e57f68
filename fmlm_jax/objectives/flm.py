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
CE_CHUNK_SIZE = {"cpu": 256}


def default_ce_chunk_size() -> int:
    return CE_CHUNK_SIZE.get(jax.default_backend(), 4096)


def antithetic_uniform(rng: jax.Array, n: int) -> jax.Array:
    """n stratified uniforms (U/n + i/n) mod 1, randomly permuted (SPEC §4)."""
    k_offset, k_perm = jax.random.split(rng)
    u = jax.random.uniform(k_offset, ())
    return jax.random.permutation(k_perm, (u / n + jnp.arange(n) / n) % 1.0)


def token_loss(params, model_config, nll: jax.Array, tau_s: jax.Array):
    """Per-token −log δ[x₁] (B, L) and its loss-weighted form e^{−w}·ℓ + w (SPEC §3.9)."""
    if not model_config.learnable_loss_weighting:
        return nll, nll
    w = model_lib.DiT(model_config).apply({"params": params}, tau_s, method=model_lib.DiT.loss_weight)
    w = w[:, None]
    return nll, jnp.exp(-w) * nll + w


def flm_loss(params, batch: dict, rng: jax.Array, config, train: bool = True):
    """Mean FLM loss over the valid tokens of the (global) batch (SPEC §4).

    batch: {'tokens': (B, L) int32, optional 'mask': (B, L), 1 where the token counts}.
    config: needs `model` (a model config) and `flm.tau_min`, `flm.tau_max`; optional
    `flm.projected_noise` (default False) and `flm.ce_chunk_size` (default: per backend).
    Draws antithetic τ (B,) and ε (B, L, K) — or, with `flm.projected_noise`, ε̃ (B, L, d)
    for the projected input path of SPEC §10 — then calls `flm_loss_at`.
    Returns (loss, metrics).
    """
    tokens = batch["tokens"]
    projected = bool(config.flm.get("projected_noise", False))
    k_tau, k_noise, k_dropout = jax.random.split(rng, 3)
    u = antithetic_uniform(k_tau, tokens.shape[0])
    tau = config.flm.tau_min + (config.flm.tau_max - config.flm.tau_min) * u
    width = config.model.hidden_size if projected else config.model.vocab_size
    eps = jax.random.normal(k_noise, (*tokens.shape, width), jnp.float32)
    return flm_loss_at(params, tokens, batch.get("mask"), tau, eps, k_dropout, config.model, train,
                       projected, config.flm.get("ce_chunk_size", None))


def flm_loss_at(params, tokens, mask, tau, eps, dropout_rng, model_config, train: bool = True,
                projected: bool = False, ce_chunk_size: int | None = None):
    """The FLM loss for given times τ (B,) and noise ε (B, L, K): −log δ_τ(x_t)[x₁].

    x_t = (1 − t)·ε + t·onehot(x₁) with t = T(τ); the network sees τ. With `projected`,
    ε is (B, L, d) and the network gets h_t = x_t·E drawn in projected form (SPEC §10).
    ce_chunk_size: tokens per chunk of the fused output cross-entropy (0: one chunk;
    None: `default_ce_chunk_size()`).
    """
    if ce_chunk_size is None:
        ce_chunk_size = default_ce_chunk_size()
    mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
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
    nll, weighted = token_loss(params, model_config, nll, tau)
    n_valid = jnp.maximum(mask.sum(), 1.0)
    loss = (weighted * mask).sum() / n_valid
    metrics = {"loss": loss, "nll": (nll * mask).sum() / n_valid}
    return loss, metrics
