"""The distillation targets (SPEC §5) for any log-denoiser, and the simplex projections.

A *log-denoiser* is a callable `log_delta(x, tau_s, tau_t)` → log δ (B, L, K): the network
(`fmlm_jax.model.log_denoiser`) or, in tests, an exact closed-form model. Every target is
returned under `stop_gradient`; each derivative is one `jax.jvp` with the network's time
input τ, so a t-tangent is scaled by dτ/dt.

States x are dense (B, L, K) arrays, or dicts of projected forms {name: x·E_name} (SPEC §10);
`lift` puts a probability vector in the state's form (identity for dense states).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fmlm_jax import interpolant

LogDenoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
ENTMAX_BISECT_ITERS = 50  # float32 bisection: the threshold interval halves to below 2⁻⁴⁰


def identity(delta):
    return delta


def rows(v: jax.Array) -> jax.Array:
    """Per-row values (B,) → (B, 1, 1) against (B, L, K)."""
    return v[:, None, None]


def flow_map(x, delta, s, t, lift=identity):
    """X_{s,t}(x) on a dense or projected state (SPEC §5)."""
    return jax.tree_util.tree_map(lambda xi, di: interpolant.flow_map(xi, di, s, t), x, lift(delta))


# ------------------------------------------------------------------ simplex projections


def sparsemax(z: jax.Array, axis: int = -1) -> jax.Array:
    """Euclidean projection of z onto the probability simplex (entmax with α = 2)."""
    z = jnp.moveaxis(z, axis, -1)
    z_sorted = -jnp.sort(-z, axis=-1)
    k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cumsum = jnp.cumsum(z_sorted, axis=-1)
    support = 1.0 + k * z_sorted > cumsum
    k_z = jnp.sum(support, axis=-1, keepdims=True)
    threshold = (jnp.take_along_axis(cumsum, k_z.astype(jnp.int32) - 1, axis=-1) - 1.0) / k_z
    return jnp.moveaxis(jnp.maximum(z - threshold, 0.0), -1, axis)


def entmax(z: jax.Array, alpha: float) -> jax.Array:
    """α-entmax over the last axis: p_i = [(α−1)·z_i − θ]₊^{1/(α−1)} with θ such that Σp = 1.

    α = 2 is sparsemax (exact, by sorting); 1 < α < 2 is solved for θ by bisection (the
    reference's `entmax_bisect`); α → 1 would be softmax and is not a projection, so it is
    refused. This is what `distill.entmax_temp_lsd` means in the reference: α, not a
    temperature (its 2.0 gives sparsemax).
    """
    alpha = float(alpha)
    if alpha == 2.0:
        return sparsemax(z)
    if not 1.0 < alpha < 2.0:
        raise ValueError(f"entmax needs α in (1, 2] (distill.entmax_temp_lsd; 2 = sparsemax), got {alpha}")
    power = 1.0 / (alpha - 1.0)
    x = (alpha - 1.0) * z
    top = jnp.max(x, axis=-1, keepdims=True)
    # Σ[x − θ]₊^power is decreasing in θ; it is ≥ 1 at θ = top − 1 and ≤ 1 at θ = top − K^(1−α).
    lo, hi = top - 1.0, top - z.shape[-1] ** (1.0 - alpha)

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        total = jnp.sum(jnp.maximum(x - mid, 0.0) ** power, axis=-1, keepdims=True)
        return jnp.where(total >= 1.0, mid, lo), jnp.where(total >= 1.0, hi, mid)

    lo, hi = jax.lax.fori_loop(0, ENTMAX_BISECT_ITERS, halve, (lo, hi))
    p = jnp.maximum(x - 0.5 * (lo + hi), 0.0) ** power
    return p / jnp.sum(p, axis=-1, keepdims=True)


# ------------------------------------------------------------------ targets


def psd_target(log_delta: LogDenoiser, x_s, tau_s, tau_u, tau_t, s, u, t,
               second_pass: LogDenoiser | None = None, lift=identity) -> jax.Array:
    """Semigroup target δ̄ = λ·δ_{s,u}(x_s) + (1−λ)·δ_{u,t}(X_{s,u}(x_s)) (no gradient).

    `second_pass` (default: log_delta) evaluates δ_{u,t}; the loss passes the same
    weights with another dropout key.
    """
    a = jnp.exp(log_delta(x_s, tau_s, tau_u))
    y = flow_map(x_s, a, s, u, lift)
    b = jnp.exp((second_pass or log_delta)(y, tau_u, tau_t))
    lam = rows(interpolant.semigroup_weight(s, u, t))
    return jax.lax.stop_gradient(lam * a + (1.0 - lam) * b)


def dlog_delta_dtau_t(log_delta: LogDenoiser, x, tau_s, tau_t):
    """(log δ_{s,t}(x), ∂ log δ/∂τ_t) by one forward-mode jvp (tangent 1 on τ_t)."""
    return jax.jvp(lambda tt: log_delta(x, tau_s, tt), (tau_t,), (jnp.ones_like(tau_t),))


def dlog_delta_along_flow(log_delta: LogDenoiser, x_s, tau_s, tau_t, dtau_dt_s, velocity):
    """(log δ_{s,t}(x_s), d/ds log δ_{s,t}(x_s(s))) for x moving with the flow.

    One jvp of (τ_s, x) ↦ log δ with tangents (dτ/dt(s), v_s(x_s)).
    """
    return jax.jvp(lambda ts, x: log_delta(x, ts, tau_t), (tau_s, x_s), (dtau_dt_s, velocity))


def lsd_target(log_delta: LogDenoiser, denoiser_t: LogDenoiser, x_s, tau_s, tau_t, s, t,
               dtau_dt_t, alpha: float = 2.0, lift=identity):
    """Lagrangian distillation: (log δ_{s,t}(x_s) with gradient, target δ̄).

    ∂_tδ = δ ⊙ ∂P/∂τ_t · dτ/dt(t), P = log δ_{s,t}(x_s);
    δ̄ = entmax_α(D_t(X_{s,t}(x_s)) − ((t−s)(1−t)/(1−s))·∂_tδ), D_t(x) = exp(denoiser_t(x, τ_t, τ_t))
    (α = 2: sparsemax, the Euclidean projection). Exact flow maps make δ̄ = δ_{s,t}.
    """
    log_p, dlog_p_dtau = dlog_delta_dtau_t(log_delta, x_s, tau_s, tau_t)
    delta = jax.lax.stop_gradient(jnp.exp(log_p))
    d_delta_dt = delta * jax.lax.stop_gradient(dlog_p_dtau) * rows(dtau_dt_t)
    x_t = flow_map(x_s, delta, s, t, lift)
    d_t = jnp.exp(denoiser_t(x_t, tau_t, tau_t))
    coeff = (t - s) * (1.0 - t) / (1.0 - s + interpolant.FLOW_MAP_EPS)
    raw = d_t - rows(coeff) * d_delta_dt
    return log_p, jax.lax.stop_gradient(entmax(raw, alpha))


def esd_target(log_delta: LogDenoiser, d_s, x_s, tau_s, tau_t, s, t, dtau_dt_s, lift=identity):
    """Eulerian distillation: (δ_{s,t}(x_s) with gradient, target δ̄).

    δ̄ = D_s + ((1−s)(t−s)/(1−t))·δ ⊙ d/ds log δ along the flow v_s = (D_s − x_s)/(1−s).
    Rows with t = 1 have no finite target (the coefficient divides by 1 − t): callers
    must mask them out (the loss does); their coefficient is set to 0 here.
    """
    velocity = jax.tree_util.tree_map(lambda xi, di: interpolant.velocity(xi, di, s), x_s, lift(d_s))
    log_p, dlog_p_ds = dlog_delta_along_flow(log_delta, x_s, tau_s, tau_t, dtau_dt_s, velocity)
    delta = jnp.exp(log_p)
    finite = t < 1.0
    coeff = jnp.where(finite, (1.0 - s) * (t - s) / jnp.where(finite, 1.0 - t, 1.0), 0.0)
    target = d_s + rows(coeff) * jax.lax.stop_gradient(delta) * dlog_p_ds
    return delta, jax.lax.stop_gradient(target)
