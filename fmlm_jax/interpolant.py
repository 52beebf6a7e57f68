"""The linear interpolant and flow-map algebra in interpolant time t (SPEC §1, §5).

x_t = (1 − t)·ε + t·onehot(x₁), ε ~ N(0, I) of shape (B, L, K). Times are per sequence,
shape (B,), and broadcast over tokens and vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FLOW_MAP_EPS = 1e-8  # added to 1 − s (and the λ denominator) as the reference does


def _rows(t: jax.Array, like: jax.Array) -> jax.Array:
    """(B,) → (B, 1, ..., 1) broadcastable against `like`."""
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def row_keys(rng: jax.Array, n: int) -> jax.Array:
    """One key per row of a global batch: rng folded with the row index, (n,) keys.

    A row's noise then depends only on its position in the global batch, so splitting the
    batch into micro-batches (gradient accumulation) draws exactly the same numbers."""
    return jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.arange(n))


def row_normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal noise (N, *shape), row i drawn from keys[i] (see `row_keys`)."""
    return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(keys)


def noisy(tokens: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_t (B, L, K) from token ids (B, L), times t (B,) and noise ε (B, L, K)."""
    onehot = jax.nn.one_hot(tokens, eps.shape[-1], dtype=eps.dtype)
    t = _rows(t, eps)
    return (1.0 - t) * eps + t * onehot


def flow_map(x: jax.Array, delta: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
    """X_{s,t}(x) = ((1−t)/(1−s))·x + ((t−s)/(1−s))·δ_{s,t}(x), with 1e-8 added to 1 − s."""
    s, t = _rows(s, x), _rows(t, x)
    denom = 1.0 - s + FLOW_MAP_EPS
    return ((1.0 - t) / denom) * x + ((t - s) / denom) * delta


def semigroup_weight(s: jax.Array, u: jax.Array, t: jax.Array) -> jax.Array:
    """λ = (1−t)(u−s) / ((1−u)(t−s) + 1e-8) ∈ [0, 1]: weight of δ_{s,u} in the PSD target."""
    return (1.0 - t) * (u - s) / ((1.0 - u) * (t - s) + FLOW_MAP_EPS)


def velocity(x: jax.Array, denoised: jax.Array, t: jax.Array) -> jax.Array:
    """The interpolant's velocity v_t(x) = (D_t(x) − x)/(1 − t)."""
    return (denoised - x) / (1.0 - _rows(t, x))


# ----------------------------------------------------------------------------- SPEC §10
# The network sees x_t only through h = x_t·E (E: the (K, d) input matrix). Per token,
# ε·E ~ N(0, EᵀE), so h can be drawn exactly in distribution from d-dimensional noise
# without ever forming the (B, L, K) tensor.


def projected_noise_factor(embedding: jax.Array) -> jax.Array:
    """C (d, d), lower triangular, with C·Cᵀ = EᵀE for E (K, d) of full column rank."""
    vocab, width = embedding.shape
    if vocab < width:
        raise ValueError(f"projected noise needs vocab_size >= hidden_size (EᵀE of full rank); got "
                         f"K={vocab} < d={width}, where the dense path is cheaper anyway")
    e = embedding.astype(jnp.float32)
    gram = jnp.dot(e.T, e, precision=jax.lax.Precision.HIGHEST)
    return jnp.linalg.cholesky(gram)


@jax.custom_vjp
def noise_factor_t(embedding: jax.Array) -> jax.Array:
    """Cᵀ (d, d) for E (K, d), with the gradient of the fixed-basis form Cᵀ = sg(Q)ᵀ·E.

    Q = E·C⁻ᵀ (K × d) is an orthonormal basis of E's columns and QᵀE = Cᵀ, so the
    projected noise ε̃·Cᵀ equals (ε·Q)·QᵀE with ε̃ = ε·Q. Holding Q fixed, ∂L/∂E = Q·M with
    M = ∂L/∂Cᵀ: since E[ε | ε·Q] = (ε·Q)·Qᵀ, this equals the dense path's gradient εᵀ·∂L/∂h
    in expectation (tested), and costs one K×d² product and a triangular solve instead
    of backpropagating through the Gram matrix and the Cholesky factorisation.
    """
    return projected_noise_factor(embedding).T


def _noise_factor_t_fwd(embedding):
    factor = projected_noise_factor(embedding)
    return factor.T, (embedding, factor)


def _noise_factor_t_bwd(residuals, m):
    embedding, factor = residuals
    # Q·M = E·C⁻ᵀ·M: solve Cᵀ·X = M, then E·X.
    x = jax.scipy.linalg.solve_triangular(factor, m, lower=True, trans="T")
    grad = jnp.dot(embedding.astype(jnp.float32), x, precision=jax.lax.Precision.HIGHEST)
    return (grad.astype(embedding.dtype),)


noise_factor_t.defvjp(_noise_factor_t_fwd, _noise_factor_t_bwd)


def projected_noisy(tokens: jax.Array, t: jax.Array, eps_d: jax.Array,
                    embedding: jax.Array) -> jax.Array:
    """h_t = x_t·E in distribution: (1 − t)·ε̃·Cᵀ + t·E[x₁], ε̃ ~ N(0, I_d) (B, L, d)."""
    noise = jnp.einsum("bld,de->ble", eps_d.astype(jnp.float32), noise_factor_t(embedding))
    t = _rows(t, noise)
    return (1.0 - t) * noise + t * embedding.astype(jnp.float32)[tokens]


def joint_noise_factors(embeddings: list[jax.Array]) -> list[jax.Array]:
    """A_i (r, d_i) with (ε·E_1, …, ε·E_m) =ᵈ (ε̃·A_1, …, ε̃·A_m), ε̃ ~ N(0, I_r) (SPEC §10).

    Several networks (student E_S, teacher E_T, EMA) must see the *same* ε: with the thin
    QR [E_1 … E_m] = Q·R (Q: K × r orthonormal, r = min(K, Σd_i)), ε·E_i = (ε·Q)·(Qᵀ·E_i)
    exactly, and ε·Q ~ N(0, I_r). QR, not a Cholesky of the Gram matrix, because the
    student starts as a copy of the teacher (E_S = E_T: the Gram matrix is singular).
    Q is held constant (stop_gradient), so the gradient into E_i is Q·(ε̃ᵀ·∂L/∂h): since
    E[ε | ε·Q] = (ε·Q)·Qᵀ, it equals the dense path's gradient εᵀ·∂L/∂h in expectation,
    and stays finite where the Gram matrix is singular.
    """
    stacked = jnp.concatenate([e.astype(jnp.float32) for e in embeddings], axis=1)
    q, _ = jnp.linalg.qr(jax.lax.stop_gradient(stacked))
    q = jax.lax.stop_gradient(q)
    return [jnp.dot(q.T, e.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
            for e in embeddings]


def lift(probs: jax.Array, embedding: jax.Array) -> jax.Array:
    """A V-space vector (probabilities) (B, L, K) in projected form: δ·E (B, L, d)."""
    return jnp.einsum("blk,kd->bld", probs, embedding.astype(jnp.float32))
