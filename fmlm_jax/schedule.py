"""Decoding-error-rate time reparameterization τ ↔ t (SPEC §2).

τ(t) = 1 − K/(K−1)·P_e(t), where P_e(t) is the probability that argmax(x_t) is not
the clean token. Training times are drawn in τ and every network time input is τ;
the interpolant and all flow-map algebra use t = T(τ).

The reference builds T = τ⁻¹ as a not-a-knot cubic spline through (τ, t) on 10000
uniform t-knots, and the forward map t → τ as the spline through (t, τ). We build the
same two scipy splines in float64 on the host. Numpy inputs are evaluated with scipy
directly (the reference construction); jax inputs are evaluated on device from the
spline's own knots and cubic coefficients, so a jitted step needs no host callback.

The map is extremely steep at τ → 1 (t ∈ [0.9, 1] spans τ ∈ [1 − 1e-11, 1]), far
below float32 resolution. On device each knot is therefore stored as a float32 pair
hi + lo (hi = float32(x), lo = float32(x − hi)) and both the interval search and the
offset τ − x use the pair, which reproduces the float64 spline at float32 inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.interpolate
import scipy.special

NUM_KNOTS = 10_000  # uniform t-knots of the reference spline
NUM_HERMITE_NODES = 100  # Gauss–Hermite rule for E_z[Φ(z + m)^(K−1)]
MONOTONE_SLOPE = 1e-10  # the reference's (t − 1)·1e-10 term that keeps τ(t) increasing


def tau_of_t_exact(t: np.ndarray, vocab_size: int) -> np.ndarray:
    """τ(t) by quadrature (SPEC §2), float64, no spline. Shape of `t`."""
    t = np.asarray(t, dtype=np.float64)
    shape = t.shape
    nodes, weights = np.polynomial.hermite.hermgauss(NUM_HERMITE_NODES)
    z = np.sqrt(2.0) * nodes  # z ~ N(0, 1) after the change of variables
    w = weights / np.sqrt(np.pi)
    t = t.reshape(-1)
    m = t / np.maximum(1.0 - t, 1e-12)
    log_phi = scipy.special.log_ndtr(z[None, :] + m[:, None])
    q = np.exp((vocab_size - 1) * log_phi) @ w  # P(argmax x_t = clean token)
    tau = (vocab_size * q - 1.0) / (vocab_size - 1.0) + (t - 1.0) * MONOTONE_SLOPE
    return np.clip(tau, 0.0, 1.0).reshape(shape)


def _split_hi_lo(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hi = x.astype(np.float32)
    lo = (x - hi.astype(np.float64)).astype(np.float32)
    return hi, lo


class _DeviceSpline:
    """A scipy PPoly (cubic) evaluated on float32 jax arrays via hi/lo knots."""

    def __init__(self, spline: scipy.interpolate.CubicSpline, lower: float, upper: float):
        self.knots_hi, self.knots_lo = _split_hi_lo(spline.x[:-1])  # left end of each piece
        # c[k, i] multiplies (x − x_i)^(3 − k).
        self.coeffs = spline.c.astype(np.float32)  # (4, n_pieces)
        self.lower, self.upper = lower, upper

    def _piece(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        # A (numel(x), n_knots) comparison: cheap for the per-sequence times it serves.
        hi, lo = jnp.asarray(self.knots_hi), jnp.asarray(self.knots_lo)
        # Knot j lies at or left of x iff hi_j < x, or hi_j == x and lo_j <= 0.
        flat = x.reshape(-1, 1)
        left = (hi[None] < flat) | ((hi[None] == flat) & (lo[None] <= 0))
        idx = jnp.clip(jnp.sum(left, axis=1) - 1, 0, hi.shape[0] - 1).reshape(x.shape)
        dx = (x - hi[idx]) - lo[idx]  # exact for x near the knot (Sterbenz)
        return idx, dx

    def __call__(self, x: jax.Array, clip: bool = True) -> jax.Array:
        idx, dx = self._piece(x)
        c = jnp.asarray(self.coeffs)[:, idx]
        y = c[3] + dx * (c[2] + dx * (c[1] + dx * c[0]))
        return jnp.clip(y, self.lower, self.upper) if clip else y

    def derivative(self, x: jax.Array) -> jax.Array:
        idx, dx = self._piece(x)
        c = jnp.asarray(self.coeffs)[:, idx]
        return c[2] + dx * (2.0 * c[1] + dx * 3.0 * c[0])


@functools.lru_cache(maxsize=8)
def _build(vocab_size: int):
    t_knots = np.linspace(0.0, 1.0, NUM_KNOTS)
    tau_knots = tau_of_t_exact(t_knots, vocab_size)
    # Reference: sort by τ and keep the first of duplicate τ values (the clip at 0 makes
    # many small t share τ = 0). The forward spline uses the same retained knots.
    order = np.argsort(tau_knots, kind="stable")
    tau_sorted, t_sorted = tau_knots[order], t_knots[order]
    _, first = np.unique(tau_sorted, return_index=True)
    tau_k, t_k = tau_sorted[first], t_sorted[first]
    inverse = scipy.interpolate.CubicSpline(tau_k, t_k, bc_type="not-a-knot")
    forward = scipy.interpolate.CubicSpline(t_k, tau_k, bc_type="not-a-knot")
    return inverse, forward


class Schedule:
    """τ ↔ t for a vocabulary of `vocab_size` tokens (SPEC §2).

    Methods accept numpy or jax arrays (or Python floats) and return the same kind:
    numpy in → float64 scipy evaluation (the reference construction); jax in →
    float32 on-device evaluation, usable inside `jax.jit`.
    """

    def __init__(self, vocab_size: int):
        if int(vocab_size) < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self._inverse, self._forward = _build(self.vocab_size)
        self._inverse_dev = _DeviceSpline(self._inverse, 0.0, 1.0)
        self._forward_dev = _DeviceSpline(self._forward, 0.0, 1.0)

    def tau_to_t(self, tau):
        """T(τ) = clip(spline(τ), 0, 1); τ = 1 maps to exactly 1."""
        if isinstance(tau, jax.Array):
            tau = tau.astype(jnp.float32)
            return jnp.where(tau >= 1.0, 1.0, self._inverse_dev(tau))
        tau = np.asarray(tau, dtype=np.float64)
        return np.where(tau >= 1.0, 1.0, np.clip(self._inverse(tau), 0.0, 1.0))

    def t_to_tau(self, t):
        """τ(t) through the forward spline, clipped to [0, 1]; t = 1 maps to 1."""
        if isinstance(t, jax.Array):
            t = t.astype(jnp.float32)
            return jnp.where(t >= 1.0, 1.0, self._forward_dev(t))
        t = np.asarray(t, dtype=np.float64)
        return np.where(t >= 1.0, 1.0, np.clip(self._forward(t), 0.0, 1.0))

    def dtau_dt(self, t):
        """dτ/dt of the clipped t → τ map (SPEC §2; used by LSD/ESD): the spline's
        derivative, and 0 where the map is clipped (t ≥ 1, or the spline dips below 0
        between the first knots). Near τ = 1 the derivative is kept even where float32
        rounds τ to 1: it is the slope of the map the reference interpolates."""
        if isinstance(t, jax.Array):
            t = t.astype(jnp.float32)
            value = self._forward_dev(t, clip=False)
            inside = (t < 1.0) & (value > 0.0)
            return jnp.where(inside, self._forward_dev.derivative(t), 0.0)
        t = np.asarray(t, dtype=np.float64)
        value = self._forward(t)
        inside = (t < 1.0) & (value > 0.0)
        return np.where(inside, self._forward(t, 1), 0.0)
