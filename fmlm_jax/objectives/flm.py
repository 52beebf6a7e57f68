"""The FLM objective: denoiser cross-entropy at antithetic τ (SPEC §4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmlm_jax import interpolant
from fmlm_jax import model as model_lib
from fmlm_jax.schedule import Schedule


def antithetic_uniform(rng: jax.Array, n: int) -> jax.Array:
    """n stratified uniforms (U/n + i/n) mod 1, randomly permuted (SPEC §4)."""
    k_offset, k_perm = jax.random.split(rng)
    u = jax.random.uniform(k_offset, ())
    return jax.random.permutation(k_perm, (u / n + jnp.arange(n) / n) % 1.0)


def token_loss(params, model_config, log_p: jax.Array, tokens: jax.Array, tau_s: jax.Array):
    """Per-token −log δ[x₁] (B, L) and its loss-weighted form e^{−w}·ℓ + w (SPEC §3.9)."""
    nll = -jnp.take_along_axis(log_p, tokens[..., None], axis=-1)[..., 0]
    if not model_config.learnable_loss_weighting:
        return nll, nll
    w = model_lib.DiT(model_config).apply({"params": params}, tau_s, method=model_lib.DiT.loss_weight)
    w = w[:, None]
    return nll, jnp.exp(-w) * nll + w


def flm_loss(params, batch: dict, rng: jax.Array, config, train: bool = True):
    """Mean FLM loss over the valid tokens of the (global) batch.

    batch: {'tokens': (B, L) int32, optional 'mask': (B, L), 1 where the token counts}.
    config: needs `model` (a model config) and `flm.tau_min`, `flm.tau_max`.
    Returns (loss, metrics).
    """
    tokens = batch["tokens"]
    mask = batch.get("mask")
    mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    batch_size = tokens.shape[0]
    vocab_size = config.model.vocab_size
    k_tau, k_noise, k_dropout = jax.random.split(rng, 3)

    u = antithetic_uniform(k_tau, batch_size)
    tau = config.flm.tau_min + (config.flm.tau_max - config.flm.tau_min) * u
    t = Schedule(vocab_size).tau_to_t(tau)
    eps = jax.random.normal(k_noise, (*tokens.shape, vocab_size), jnp.float32)
    x_t = interpolant.noisy(tokens, t, eps)

    logits = model_lib.DiT(config.model).apply(
        {"params": params}, x_t, tau, train=train, rngs={"dropout": k_dropout}
    )
    log_p = model_lib.log_probs(logits, config.model.get("output_cap", 30.0))
    nll, weighted = token_loss(params, config.model, log_p, tokens, tau)
    n_valid = jnp.maximum(mask.sum(), 1.0)
    loss = (weighted * mask).sum() / n_valid
    metrics = {"loss": loss, "nll": (nll * mask).sum() / n_valid}
    return loss, metrics
