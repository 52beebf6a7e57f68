"""Samplers (SPEC §6), each jit-compiled with its step loop inside.

Runs are reproducible: the caller passes the initial noise z0 (B, L, K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmlm_jax import model as model_lib
from fmlm_jax.schedule import Schedule

EULER_EPS = 1e-5  # the reference's guard in (D − z)/(1 − t + 1e-5)


def _check(config, z0, num_steps: int) -> ml_collections.FrozenConfigDict:
    cfg = model_lib.resolve_config(config)
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if z0.ndim != 3 or z0.shape[-1] != cfg.vocab_size:
        raise ValueError(f"z0 must be (B, L, {cfg.vocab_size}), got {tuple(z0.shape)}")
    return ml_collections.FrozenConfigDict(cfg)


def _denoiser(params, config, z, tau_s, tau_t=None):
    """δ = capped softmax of the network at times τ (scalars broadcast over the batch)."""
    logits = model_lib.DiT(config).apply({"params": params}, z, tau_s, tau_t)
    return jnp.exp(model_lib.log_probs(logits, config.output_cap))


def flm_time_grid(vocab_size: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """τ_i = i/N and t_i = T(τ_i), i = 0..N (float64 host values, the reference spline)."""
    tau = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    return tau, Schedule(vocab_size).tau_to_t(tau)


@functools.partial(jax.jit, static_argnames=("config", "num_steps"))
def _flm_sample(params, config, z0, num_steps):
    tau, t = (jnp.asarray(a, jnp.float32) for a in flm_time_grid(config.vocab_size, num_steps))

    def euler_step(i, z):
        denoised = _denoiser(params, config, z, tau[i])
        return z + (t[i + 1] - t[i]) * (denoised - z) / (1.0 - t[i] + EULER_EPS)

    z = jax.lax.fori_loop(0, num_steps - 1, euler_step, z0.astype(jnp.float32))
    # The last step jumps to the denoiser's prediction: argmax D_{τ_{N−1}}(z).
    return jnp.argmax(_denoiser(params, config, z, tau[num_steps - 1]), axis=-1).astype(jnp.int32)


def flm_sample(params, config, z0: jax.Array, num_steps: int) -> jax.Array:
    """FLM Euler sampler (SPEC §6): token ids (B, L), deterministic given z0.

    For i < N−1: z ← z + (t_{i+1} − t_i)·(D_{τ_i}(z) − z)/(1 − t_i + 1e-5); then
    argmax D_{τ_{N−1}}(z). N network evaluations.
    """
    frozen = _check(config, z0, num_steps)
    return _flm_sample(params, frozen, jnp.asarray(z0), int(num_steps))
