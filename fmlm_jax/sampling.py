"""Samplers (SPEC §6), each jit-compiled with its step loop inside.

Runs are reproducible: the caller passes the initial noise z0 (B, L, K). With
`projected=True` (the config switch `flm.projected_noise`, SPEC §10) the caller passes
z0 = ε̃ (B, L, d) instead; the samplers then carry h = z·E, whose updates are the same
linear combinations with every probability vector δ replaced by δ·E and every Gaussian
draw ξ by ε̃·Cᵀ (C·Cᵀ = EᵀE): equal in distribution, no (B, L, K) state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmlm_jax import interpolant
from fmlm_jax import model as model_lib
from fmlm_jax.schedule import Schedule

EULER_EPS = 1e-5  # the reference's guard in (D − z)/(1 − t + 1e-5)


def _check(config, z0, num_steps: int, projected: bool = False) -> ml_collections.FrozenConfigDict:
    cfg = model_lib.resolve_config(config)
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    width, what = (cfg.hidden_size, "hidden_size d (projected=True)") if projected else (
        cfg.vocab_size, "vocab_size K")
    if z0.ndim != 3 or z0.shape[-1] != width:
        raise ValueError(f"z0 must be (B, L, {width}) with the {what}, got {tuple(z0.shape)}")
    return ml_collections.FrozenConfigDict(cfg)


def _start(params, z0, projected: bool):
    """The initial state: z0, or h0 = ε̃·Cᵀ (the law of z₀·E) when projected."""
    if not projected:
        return z0.astype(jnp.float32)
    factor = interpolant.projected_noise_factor(params["vocab_embed"]["embedding"])
    return jnp.einsum("bld,ed->ble", z0.astype(jnp.float32), factor)


def flm_time_grid(vocab_size: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """τ_i = i/N and t_i = T(τ_i), i = 0..N (float64 host values, the reference spline)."""
    tau = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    return tau, Schedule(vocab_size).tau_to_t(tau)


def _euler_sample(params, config, state0, num_steps, embedded: bool):
    """The Euler loop on z (B, L, K), or on h = z·E (B, L, d) when `embedded` (SPEC §10):
    every update is linear in z, so it carries over to h with δ replaced by δ·E."""
    tau, t = (jnp.asarray(a, jnp.float32) for a in flm_time_grid(config.vocab_size, num_steps))
    embedding = params["vocab_embed"]["embedding"].astype(jnp.float32)
    scores = model_lib.denoiser_scores(params, config, embedded=embedded)

    def euler_step(i, state):
        target = jax.nn.softmax(scores(state, tau[i]), axis=-1)  # D_{τ_i}(z)
        if embedded:
            target = jnp.einsum("blk,kd->bld", target, embedding)
        return state + (t[i + 1] - t[i]) * (target - state) / (1.0 - t[i] + EULER_EPS)

    state = jax.lax.fori_loop(0, num_steps - 1, euler_step, state0.astype(jnp.float32))
    # The last step jumps to the denoiser's prediction: argmax D_{τ_{N−1}}(z), taken on the
    # capped logits (softmax is monotone), which skips a (B, L, K) log-softmax and exp.
    return jnp.argmax(scores(state, tau[num_steps - 1]), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "num_steps", "projected"))
def _flm_sample(params, config, z0, num_steps, projected):
    return _euler_sample(params, config, _start(params, z0, projected), num_steps, embedded=projected)


def flm_sample(params, config, z0: jax.Array, num_steps: int, projected: bool = False) -> jax.Array:
    """FLM Euler sampler (SPEC §6): token ids (B, L), deterministic given z0.

    For i < N−1: z ← z + (t_{i+1} − t_i)·(D_{τ_i}(z) − z)/(1 − t_i + 1e-5); then
    argmax D_{τ_{N−1}}(z). N network evaluations. projected: z0 is ε̃ (B, L, d) and the
    loop carries h = z·E (SPEC §10); equal in distribution, not sample by sample.
    """
    frozen = _check(config, z0, num_steps, projected)
    return _flm_sample(params, frozen, jnp.asarray(z0), int(num_steps), bool(projected))


def flm_sample_projected(params, config, eps0: jax.Array, num_steps: int) -> jax.Array:
    """`flm_sample(..., projected=True)`: starts from ε̃ (B, L, d) ~ N(0, I)."""
    return flm_sample(params, config, eps0, num_steps, projected=True)


def fmlm_time_grid(vocab_size: int, num_steps: int, gamma: float) -> dict[str, np.ndarray]:
    """Per-step times of the γ-sampler (SPEC §6), float64 host values, shape (N,) each.

    Step i: τ_s = i/N, s = T(τ_s), t⁺ = T((i+1)/N), σ = 1 − t⁺, σ̃ = σ·√(1−γ²),
    t̃ = 1 − σ̃, τ̃ = τ(t̃) (the grid point itself when γ = 0).
    """
    schedule = Schedule(vocab_size)
    grid = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    tau_s, tau_next = grid[:-1], grid[1:]
    s, t_next = schedule.tau_to_t(tau_s), schedule.tau_to_t(tau_next)
    sigma = 1.0 - t_next
    sigma_tilde = sigma * np.sqrt(1.0 - gamma**2)
    t_tilde = 1.0 - sigma_tilde
    tau_tilde = tau_next if gamma == 0.0 else schedule.t_to_tau(t_tilde)
    return dict(tau_s=tau_s, s=s, t_next=t_next, sigma=sigma, sigma_tilde=sigma_tilde,
                t_tilde=t_tilde, tau_tilde=tau_tilde)


def fmlm_loop(log_delta, z0: jax.Array, grid: dict, gamma: float, rng, lift=None,
              noise=None, scores=None) -> jax.Array:
    """The γ-sampler for any log-denoiser `log_delta(z, τ_s, τ_t)` → log δ (B, L, K).

    z̃ = ((1−t̃)/(1−s))·z + ((t̃−s)/(1−s))·δ; for γ > 0, z ← z̃ + (σ̃ − σ)·δ + γσ·ξ,
    which restores the interpolant's noise level σ at t⁺. The last step returns argmax δ.
    For the projected form (SPEC §10): `lift(δ)` = δ·E and `noise(key, shape)` draws ξ·E;
    by default the state is z itself and ξ ~ N(0, I). `scores(z, τ_s, τ_t)`: anything with
    the argmax of δ for the last step (default log_delta; the network passes its capped
    logits, skipping a (B, L, K) log-softmax).
    """
    scores = log_delta if scores is None else scores
    lift = (lambda d: d) if lift is None else lift
    if noise is None:
        def noise(key, shape):
            return jax.random.normal(key, shape, jnp.float32)
    g = {k: jnp.asarray(v, jnp.float32) for k, v in grid.items()}
    num_steps = grid["tau_s"].shape[0]
    batch = z0.shape[0]

    def delta_at(i, z):
        tau_s = jnp.full((batch,), g["tau_s"][i])
        tau_t = jnp.full((batch,), g["tau_tilde"][i])
        return jnp.exp(log_delta(z, tau_s, tau_t))

    def step(i, z):
        delta = lift(delta_at(i, z))
        s, t_tilde = g["s"][i], g["t_tilde"][i]
        z_tilde = ((1.0 - t_tilde) * z + (t_tilde - s) * delta) / (1.0 - s)
        if gamma == 0.0:
            return z_tilde
        xi = noise(jax.random.fold_in(rng, i), z.shape)
        return z_tilde + (g["sigma_tilde"][i] - g["sigma"][i]) * delta + gamma * g["sigma"][i] * xi

    z = jax.lax.fori_loop(0, num_steps - 1, step, z0.astype(jnp.float32))
    last = num_steps - 1
    final = scores(z, jnp.full((batch,), g["tau_s"][last]), jnp.full((batch,), g["tau_tilde"][last]))
    return jnp.argmax(final, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "num_steps", "gamma", "projected"))
def _fmlm_sample(params, config, z0, rng, num_steps, gamma, projected):
    capped_logits = model_lib.denoiser_scores(params, config, embedded=projected)
    log_delta = model_lib.log_denoiser(params, config, embedded=projected)

    grid = fmlm_time_grid(config.vocab_size, num_steps, gamma)
    if not projected:
        return fmlm_loop(log_delta, z0, grid, gamma, rng, scores=capped_logits)
    embedding = params["vocab_embed"]["embedding"]
    factor = interpolant.projected_noise_factor(embedding)

    def noise(key, shape):  # ξ·E ~ N(0, EᵀE) per token, drawn as ε̃·Cᵀ
        return jnp.einsum("bld,ed->ble", jax.random.normal(key, shape, jnp.float32), factor)

    return fmlm_loop(log_delta, _start(params, z0, True), grid, gamma, rng,
                     lift=lambda d: interpolant.lift(d, embedding), noise=noise, scores=capped_logits)


def fmlm_sample(params, config, z0: jax.Array, num_steps: int, gamma: float = 0.0,
                rng: jax.Array | None = None, projected: bool = False) -> jax.Array:
    """FMLM γ-sampler (SPEC §6): token ids (B, L) from a two-time model.

    N network evaluations; one step is argmax δ_{0,1}(z0). γ ∈ [0, 1] re-injects noise
    between steps (reference evaluation: 0.8 on LM1B, 1.0 on OWT) and then needs `rng`.
    projected: z0 is ε̃ (B, L, d) and the loop carries h = z·E (SPEC §10).
    """
    frozen = _check(config, z0, num_steps, projected)
    if not frozen.two_time:
        raise ValueError("fmlm_sample needs a two-time model (two_time=True); use flm_sample "
                         "for an FLM")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    if gamma > 0.0 and num_steps > 1 and rng is None:
        raise ValueError("gamma > 0 draws fresh noise between steps: pass rng=jax.random.key(...)")
    rng = jax.random.key(0) if rng is None else rng  # unused when no noise is drawn
    return _fmlm_sample(params, frozen, jnp.asarray(z0), rng, int(num_steps), float(gamma),
                        bool(projected))


def initial_noise(rng: jax.Array, num: int, seq_len: int, model_config, projected: bool = False) -> jax.Array:
    """z₀ ~ N(0, I) of shape (num, L, K), or ε̃ (num, L, d) for the projected samplers (SPEC §10)."""
    cfg = model_lib.resolve_config(model_config)
    width = cfg.hidden_size if projected else cfg.vocab_size
    return jax.random.normal(rng, (num, seq_len, width), jnp.float32)


def generate(params, model_config, z0: jax.Array, num_steps: int, *, gamma: float = 0.0,
             rng: jax.Array | None = None, projected: bool = False) -> jax.Array:
    """Token ids (B, L) from the sampler the model calls for (SPEC §6): the FMLM γ-sampler for
    a two-time model, FLM Euler for a one-time one (which has no γ). z0 from `initial_noise`."""
    if model_lib.resolve_config(model_config).two_time:
        return fmlm_sample(params, model_config, z0, num_steps, gamma, rng, projected)
    if gamma != 0.0:
        raise ValueError(f"gamma={gamma} applies to FMLM (two-time) models only; this is an FLM "
                         "(Euler sampler): use gamma=0")
    return flm_sample(params, model_config, z0, num_steps, projected)


def sampler_name(model_config) -> str:
    """'fmlm' (γ-sampler) for a two-time model, 'flm' (Euler) otherwise."""
    return "fmlm" if model_lib.resolve_config(model_config).two_time else "flm"
