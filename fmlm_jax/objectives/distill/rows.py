"""The row sampler of FMLM distillation: which rows of the global batch train what (SPEC §5).

The global batch of N rows is laid out [diagonal | boundary | off-diagonal]:
  diagonal      τ_s = τ_t ~ U (antithetic), trained towards D_s;
  boundary      (τ_s, τ_t) = (0, 1): the one-step map;
  off-diagonal  the method's target at `uniform_diff` or `uniform_st` times.
Boundary and off-diagonal rows go through the same code (the method's term); only
their times differ, so the one structural split of a batch is [diagonal | the rest].

Gradient accumulation (`train.grad_accum_steps` = m) takes micro-batch j = rows j, j+m,
j+2m, ... of the plan drawn here over the *global* batch: with ⌊N·f⌋ divisible by m each
micro-batch is again [⌊N·f⌋/m diagonal | the rest], and the boundary rows are spread
over the micro-batches instead of vanishing (per micro-batch, OWT's 32 rows would get
⌊32·(0.5 + 0.5/32)⌋ − 16 = 0 of them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fmlm_jax import interpolant
from fmlm_jax.objectives.flm import antithetic_uniform

OFFDIAG_SAMPLINGS = ("uniform_diff", "uniform_st")


def split_rows(n: int, diagonal_fraction: float, boundary_prob: float) -> tuple[int, int, int]:
    """(n_diag, n_boundary, n_offdiag) over a global batch of n rows (SPEC §5).

    n_diag = ⌊n·f⌋, n_boundary = ⌊n·(f + (1−f)/P)⌋ − n_diag; the rest is off-diagonal.
    """
    f = diagonal_fraction
    n_diag = math.floor(n * f)
    n_boundary = math.floor(n * (f + (1.0 - f) / boundary_prob)) - n_diag
    return n_diag, n_boundary, n - n_diag - n_boundary


def offdiag_times(rng: jax.Array, n: int, sampling: str) -> tuple[jax.Array, jax.Array]:
    """(τ_s, τ_t) of n off-diagonal rows, τ_s ≤ τ_t.

    uniform_diff (default): gap d ~ U, start s′ ~ U, τ_s = s′·(1 − d), τ_t = τ_s + d
    (the gap is uniform); uniform_st: two sorted uniforms (the gap has density 2(1 − g)).
    """
    k_a, k_b = jax.random.split(rng)
    a, b = jax.random.uniform(k_a, (n,)), jax.random.uniform(k_b, (n,))
    if sampling == "uniform_diff":
        tau_s = b * (1.0 - a)
        return tau_s, tau_s + a
    if sampling == "uniform_st":
        return jnp.minimum(a, b), jnp.maximum(a, b)
    raise ValueError(f"distill.offdiag_sampling must be one of {OFFDIAG_SAMPLINGS}, got {sampling!r}")


def draw_plan(rng: jax.Array, n: int, config) -> dict:
    """Per-row randomness of a global batch of n rows, laid out [diagonal | boundary | off]:
    {'tau_s', 'tau_u', 'tau_t'} (n,) each (τ_u the midpoint in τ, the reference's choice)
    and 'key' (n,): one noise key per row (`interpolant.row_keys`).

    config: the run config (its `distill` group: diagonal_fraction, boundary_prob,
    offdiag_sampling).
    """
    dc = config.distill
    n_diag, n_bnd, n_off = split_rows(n, dc.diagonal_fraction, dc.boundary_prob)
    k_diag, k_off, k_noise = jax.random.split(rng, 3)
    diag = antithetic_uniform(k_diag, n_diag)
    off_s, off_t = offdiag_times(k_off, n_off, dc.offdiag_sampling)
    tau_s = jnp.concatenate([diag, jnp.zeros((n_bnd,)), off_s])
    tau_t = jnp.concatenate([diag, jnp.ones((n_bnd,)), off_t])
    return {"tau_s": tau_s, "tau_u": 0.5 * (tau_s + tau_t), "tau_t": tau_t,
            "key": interpolant.row_keys(k_noise, n)}


def diagonal_rows(n: int, config) -> int:
    """The number of leading diagonal rows of a batch of n rows cut from the plan.

    ⌊n·f⌋; for a micro-batch of a global batch N = m·n this equals ⌊N·f⌋/m exactly when m
    divides ⌊N·f⌋ (`check_accumulation`)."""
    return math.floor(n * config.distill.diagonal_fraction)


def check_accumulation(global_batch: int, accumulation: int, config) -> None:
    """ValueError unless every micro-batch gets the same number of diagonal rows."""
    n_diag, _, _ = split_rows(global_batch, config.distill.diagonal_fraction, config.distill.boundary_prob)
    if n_diag % accumulation:
        raise ValueError(
            f"the {n_diag} diagonal rows of data.batch_size {global_batch} do not split evenly over "
            f"train.grad_accum_steps={accumulation} micro-batches; pick a batch size or accumulation "
            "for which ⌊batch·distill.diagonal_fraction⌋ is divisible by grad_accum_steps")
