"""Interpolant and flow-map algebra (SPEC §1, §5) against hand formulas in numpy float64, and
the projected-noise input path (SPEC §10): exact in distribution, measured on the functions
the training path calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize, tiny_model_config

from fmlm_jax import interpolant
from fmlm_jax.interpolant import flow_map, noisy, semigroup_weight, velocity
from fmlm_jax.model import DiT, init_params
from fmlm_jax.objectives.distill import loss as distill_loss

B, L, K = 4, 5, 7


def _onehot(tokens, k):
    return np.eye(k, dtype=np.float64)[tokens]


def _simplex(rng, shape):
    """Random probability vectors over the last axis."""
    p = rng.gamma(0.5, size=shape)
    return p / p.sum(-1, keepdims=True)


def _times(rng, n, low=0.0, high=0.95):
    return rng.uniform(low, high, n).astype(np.float32)


def _sorted_triples(rng, n, low=0.0, high=0.95, gap=1e-2):
    """s < u < t (float32, each (B,)) with every gap at least `gap`."""
    x = np.sort(rng.uniform(low, high, (50 * n, 3)), axis=1)
    x = x[np.all(np.diff(x, axis=1) >= gap, axis=1)][:n]
    assert len(x) == n
    return [x[:, i].astype(np.float32) for i in range(3)]


def _rows(t):
    return np.asarray(t, np.float64)[:, None, None]


def _np(x):
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------------------------------------
# x_t = (1 − t)·ε + t·onehot(x₁)


def test_noisy_matches_hand_formula():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, K, (B, L))
    t = np.array([0.0, 0.3, 0.77, 1.0], np.float32)
    eps = rng.standard_normal((B, L, K)).astype(np.float32)
    got = noisy(jnp.asarray(tokens), jnp.asarray(t), jnp.asarray(eps))
    assert got.shape == (B, L, K) and got.dtype == jnp.float32
    want = (1.0 - _rows(t)) * eps + _rows(t) * _onehot(tokens, K)
    np.testing.assert_allclose(_np(got), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(_np(got)[0], eps[0])  # t = 0: pure noise
    np.testing.assert_array_equal(_np(got)[3], _onehot(tokens[3], K))  # t = 1: clean one-hot


# ---------------------------------------------------------------------------------------------
# X_{s,t}(x) = ((1−t)/(1−s))·x + ((t−s)/(1−s))·δ


def test_flow_map_matches_hand_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, L, K)).astype(np.float32)
    delta = _simplex(rng, (B, L, K)).astype(np.float32)
    s, _, t = _sorted_triples(rng, B)
    got = flow_map(jnp.asarray(x), jnp.asarray(delta), jnp.asarray(s), jnp.asarray(t))
    denom = 1.0 - _rows(s) + 1e-8
    want = ((1.0 - _rows(t)) / denom) * x + ((_rows(t) - _rows(s)) / denom) * delta
    np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-6)


def test_flow_map_boundary_conditions():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, L, K)).astype(np.float32)
    delta = _simplex(rng, (B, L, K)).astype(np.float32)
    s = np.array([0.0, 0.3, 0.8, 0.99], np.float32)
    # X_{s,s}(x) = x up to the 1e-8 added to 1 − s (relative 1e-8/(1 − s) ≤ 1e-6 here).
    same = flow_map(jnp.asarray(x), jnp.asarray(delta), jnp.asarray(s), jnp.asarray(s))
    np.testing.assert_allclose(_np(same), x, rtol=2e-6, atol=1e-7)
    # X_{s,1}(x) = δ: the x term vanishes exactly.
    one = np.ones(B, np.float32)
    end = flow_map(jnp.asarray(x), jnp.asarray(delta), jnp.asarray(s), jnp.asarray(one))
    np.testing.assert_allclose(_np(end), delta, rtol=2e-6, atol=1e-7)
    # Boundary row of the distillation batch: (s, t) = (0, 1) returns δ whatever x is.
    end0 = flow_map(jnp.asarray(x), jnp.asarray(delta), jnp.zeros(B), jnp.ones(B))
    np.testing.assert_allclose(_np(end0), delta, rtol=1e-7, atol=1e-8)


def test_flow_map_of_exact_denoiser_for_single_point_data():
    # With data a single point x₁, the exact denoiser is δ ≡ onehot(x₁) and the flow map
    # transports x_s to x_t along the same noise: X_{s,t}(x_s) = x_t.
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, K, (B, L)))
    eps = jnp.asarray(rng.standard_normal((B, L, K)).astype(np.float32))
    onehot = jnp.asarray(_onehot(np.asarray(tokens), K).astype(np.float32))
    s, _, t = _sorted_triples(rng, B, high=0.95)
    s, t = jnp.asarray(s), jnp.asarray(t)
    x_s, x_t = noisy(tokens, s, eps), noisy(tokens, t, eps)
    np.testing.assert_allclose(_np(flow_map(x_s, onehot, s, t)), _np(x_t), rtol=1e-5, atol=2e-6)
    # Its velocity (δ − x)/(1 − t) is the interpolant's time derivative ε-free: onehot − ε.
    v = velocity(x_s, onehot, s)
    np.testing.assert_allclose(_np(v), _np(onehot - eps), rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# λ = (1−t)(u−s)/((1−u)(t−s) + 1e-8) and semigroup consistency


def test_semigroup_weight_range_and_formula():
    rng = np.random.default_rng(4)
    x = np.sort(rng.uniform(0.0, 1.0, (4096, 3)), axis=1).astype(np.float32)
    s, u, t = x[:, 0], x[:, 1], x[:, 2]
    lam = _np(semigroup_weight(jnp.asarray(s), jnp.asarray(u), jnp.asarray(t)))
    assert lam.min() >= 0.0 and lam.max() <= 1.0 + 1e-6, (lam.min(), lam.max())
    s64, u64, t64 = (np.asarray(a, np.float64) for a in (s, u, t))
    want = (1 - t64) * (u64 - s64) / ((1 - u64) * (t64 - s64) + 1e-8)
    ok = (t64 - s64) > 1e-3  # away from s ≈ t, where float32 differences lose digits
    np.testing.assert_allclose(lam[ok], want[ok], rtol=1e-4, atol=1e-6)
    # Degenerate ends: u = s → 0; s = u = t → 0 (not NaN); t = 1 → 0; u = t → ≈ 1.
    stu = jnp.array([[0.3, 0.3, 0.6], [0.5, 0.5, 0.5], [0.0, 0.8, 1.0], [0.2, 0.7, 0.7]])
    ends = _np(semigroup_weight(stu[:, 0], stu[:, 1], stu[:, 2]))
    np.testing.assert_allclose(ends, [0.0, 0.0, 0.0, 1.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "stu,want",
    [
        ((0.76426, 0.79388, 0.81406), 0.53656),
        ((0.80448, 0.81638, 0.8281), 0.47182),
        ((0.0, 0.80448, 1.0), 0.0),
    ],
)
def test_semigroup_weight_spec_fixtures(stu, want):
    # SPEC §5 (K = 30522). The published (s, u, t) are rounded to 5 digits, which moves λ by
    # up to ~|∂λ/∂(s,u,t)|·5e-6 ≈ 2e-4 on these triples.
    s, u, t = (jnp.array([v], jnp.float32) for v in stu)
    lam = float(_np(semigroup_weight(s, u, t))[0])
    assert abs(lam - want) <= 3e-4, lam


def test_semigroup_weight_spec_fixtures_from_schedule():
    # The same λ from the schedule's own (s, u, t) for the τ-triples, to the published digits.
    from fmlm_jax.schedule import Schedule

    sched = Schedule(30522)
    taus = np.array([[0.2, 0.4, 0.6], [0.5, 0.625, 0.75], [0.0, 0.5, 1.0]])
    s, u, t = (sched.tau_to_t(taus[:, i]) for i in range(3))
    lam = _np(semigroup_weight(jnp.asarray(s), jnp.asarray(u), jnp.asarray(t)))
    np.testing.assert_allclose(lam, [0.53656, 0.47182, 0.0], rtol=0, atol=2e-5)


def test_semigroup_consistency():
    # X_{u,t}(X_{s,u}(x; a); b) = X_{s,t}(x; λ·a + (1 − λ)·b): the PSD target is the one-jump
    # denoiser that reproduces the two-jump composition.
    rng = np.random.default_rng(5)
    n = 64
    x = jnp.asarray(rng.standard_normal((n, L, K)).astype(np.float32))
    a = jnp.asarray(_simplex(rng, (n, L, K)).astype(np.float32))
    b = jnp.asarray(_simplex(rng, (n, L, K)).astype(np.float32))
    s, u, t = (jnp.asarray(v) for v in _sorted_triples(rng, n, high=0.98, gap=1e-2))
    two_jumps = flow_map(flow_map(x, a, s, u), b, u, t)
    lam = semigroup_weight(s, u, t)[:, None, None]
    one_jump = flow_map(x, lam * a + (1.0 - lam) * b, s, t)
    np.testing.assert_allclose(_np(one_jump), _np(two_jumps), rtol=1e-4, atol=1e-5)
    # δ̄ stays on the simplex.
    dbar = _np(lam * a + (1.0 - lam) * b)
    assert dbar.min() >= 0.0
    np.testing.assert_allclose(dbar.sum(-1), 1.0, rtol=0, atol=1e-5)
    # Boundary rows (s, t) = (0, 1): λ = 0 and the one jump lands on b = δ_{u,1}.
    z = jnp.zeros(n)
    lam01 = semigroup_weight(z, u, jnp.ones(n))
    np.testing.assert_allclose(_np(lam01), 0.0, atol=1e-7)
    np.testing.assert_allclose(
        _np(flow_map(flow_map(x, a, z, u), b, u, jnp.ones(n))), _np(b), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# v_t(x) = (D_t(x) − x)/(1 − t)


def test_velocity_matches_hand_formula():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((B, L, K)).astype(np.float32)
    d = _simplex(rng, (B, L, K)).astype(np.float32)
    t = _times(rng, B)
    got = velocity(jnp.asarray(x), jnp.asarray(d), jnp.asarray(t))
    want = (d - x) / (1.0 - _rows(t))
    np.testing.assert_allclose(_np(got), want, rtol=1e-5, atol=1e-6)
    # Euler with the velocity equals the flow map with the same denoiser (X_{s,t} is one
    # Euler step of the probability-flow ODE with D frozen): x + (t − s)·v_s = X_{s,t}(x; D).
    s = t
    t2 = (s + 0.5 * (1.0 - s)).astype(np.float32)
    euler = _np(x) + (t2 - s)[:, None, None].astype(np.float64) * _np(got)
    fm = flow_map(jnp.asarray(x), jnp.asarray(d), jnp.asarray(s), jnp.asarray(t2))
    np.testing.assert_allclose(_np(fm), euler, rtol=1e-5, atol=2e-6)


def _covariance_tolerance(target, n):
    return 6 * np.sqrt((np.diag(target)[:, None] * np.diag(target)[None, :] + target**2) / n)


def test_projected_noise_has_the_dense_covariance():
    # Measured on the training path's own function: h = projected_noisy(x₁, t, ε̃, E) must have
    # the law of x_t·E, i.e. mean t·E[x₁] and covariance (1 − t)²·EᵀE per token.
    e = jax.random.normal(jax.random.key(0), (40, 6)) / 3.0 + 0.2 * jnp.eye(40, 6)  # E (K, d)
    factor = interpolant.projected_noise_factor(e)
    np.testing.assert_allclose(factor @ factor.T, e.T @ e, rtol=1e-5, atol=1e-6)
    n, t = 100_000, 0.3
    tokens = jnp.full((n, 1), 7, jnp.int32)
    eps_d = jax.random.normal(jax.random.key(2), (n, 1, 6))
    h = np.asarray(interpolant.projected_noisy(tokens, jnp.full((n,), t), eps_d, e))[:, 0]
    dense = np.asarray(interpolant.noisy(tokens[:20_000], jnp.full((20_000,), t),
                                         jax.random.normal(jax.random.key(1), (20_000, 1, 40))) @ e)[:, 0]
    target = (1 - t) ** 2 * np.asarray(e.T @ e, np.float64)
    for sample in (h, dense):
        m = len(sample)
        np.testing.assert_array_less(np.abs(np.cov(sample, rowvar=False) - target),
                                     _covariance_tolerance(target, m))
        np.testing.assert_array_less(np.abs(sample.mean(0) - t * np.asarray(e[7])),
                                     6 * np.sqrt(np.diag(target) / m))


def test_distillation_noise_is_drawn_jointly_for_every_network():
    # The distillation loss's own noisy inputs (student, teacher, EMA views of one x_s): each
    # view is x_s·E_i in law, and the views are jointly x_s·[E_S E_T] (one shared ε).
    e_s = jax.random.normal(jax.random.key(0), (30, 4)) / 2.0
    e_t = e_s + 0.3 * jax.random.normal(jax.random.key(1), (30, 4))
    nets = {"student": {"vocab_embed": {"embedding": e_s}}, "teacher": {"vocab_embed": {"embedding": e_t}}}
    n, s = 60_000, 0.25
    tokens = jnp.full((n, 1), 3, jnp.int32)
    eps = jax.random.normal(jax.random.key(2), (n, 1, 8))  # r = d_S + d_T
    x_s, lift = distill_loss.noisy_state(tokens, jnp.full((n,), s), eps, nets, projected=True)
    joint = np.concatenate([np.asarray(x_s["student"])[:, 0], np.asarray(x_s["teacher"])[:, 0]], axis=1)
    both = np.asarray(jnp.concatenate([e_s, e_t], axis=1), np.float64)
    target = (1 - s) ** 2 * both.T @ both
    np.testing.assert_array_less(np.abs(np.cov(joint, rowvar=False) - target),
                                 _covariance_tolerance(target, n))
    np.testing.assert_allclose(joint.mean(0), s * both[3], atol=6 * np.sqrt(np.diag(target).max() / n))
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(3), (2, 1, 30)))
    np.testing.assert_allclose(lift(probs)["teacher"], probs @ e_t, rtol=1e-5)


SMALL = dict(vocab_size=40, hidden_size=16, n_heads=2)  # K ≥ d, as in every real model
def test_projected_input_matches_dense_at_the_clean_end_and_without_noise():
    cfg = tiny_model_config(**SMALL)
    params = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    e = params["vocab_embed"]["embedding"]
    tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, cfg.vocab_size)
    eps_k = jax.random.normal(jax.random.key(3), (2, 5, cfg.vocab_size))
    eps_d = jax.random.normal(jax.random.key(4), (2, 5, cfg.hidden_size))
    t = jnp.array([1.0, 1.0])  # no noise left: both paths give E[x₁] exactly
    dense_h = interpolant.noisy(tokens, t, eps_k) @ e
    np.testing.assert_allclose(interpolant.projected_noisy(tokens, t, eps_d, e), dense_h, atol=1e-5)
    # The model's embedded path is the dense path with h given: same logits.
    x = interpolant.noisy(tokens, jnp.array([0.3, 0.8]), eps_k)
    tau = jnp.array([0.1, 0.6])
    a = DiT(cfg).apply({"params": params}, x, tau)
    b = DiT(cfg).apply({"params": params}, x @ e, tau, embedded=True)
    np.testing.assert_allclose(a, b, atol=2e-5)
    with pytest.raises(ValueError, match="embedded input must be"):
        DiT(cfg).apply({"params": params}, x, tau, embedded=True)
    with pytest.raises(ValueError, match="vocab_size >= hidden_size"):
        interpolant.projected_noise_factor(jnp.ones((8, 16)))
def test_joint_noise_factors_reproduce_the_joint_covariance():
    e_s = jax.random.normal(jax.random.key(0), (40, 6)) / 3.0
    e_t = e_s + 0.1 * jax.random.normal(jax.random.key(1), (40, 6))
    for pair in ([e_s, e_t], [e_s, e_s]):  # E_S = E_T: the student's first step (singular Gram)
        factors = interpolant.joint_noise_factors(pair)
        assert factors[0].shape == (12, 6)
        for a, ea in zip(factors, pair, strict=True):  # Cov(ε̃A_i, ε̃A_j) = A_iᵀA_j = E_iᵀE_j
            for b, eb in zip(factors, pair, strict=True):
                np.testing.assert_allclose(a.T @ b, ea.T @ eb, atol=1e-5)
        n = 100_000
        joint = jax.random.normal(jax.random.key(2), (n, 12)) @ jnp.concatenate(factors, axis=1)
        target = np.asarray(jnp.concatenate(pair, 1).T @ jnp.concatenate(pair, 1))
        tol = 6 * np.sqrt((np.diag(target)[:, None] * np.diag(target)[None, :] + target**2) / n)
        assert np.all(np.abs(np.cov(np.asarray(joint), rowvar=False) - target) < tol)
    # The gradient stays finite where the Gram matrix is singular.
    grad = jax.grad(lambda e: interpolant.joint_noise_factors([e, e_s])[0].sum())(e_s)
    assert np.all(np.isfinite(np.asarray(grad)))
    # K < Σd: the factors are exact with r = K (ε·Q is all of ε, rotated).
    small = [e_s[:8], e_t[:8]]
    factors = interpolant.joint_noise_factors(small)
    assert factors[0].shape == (8, 6)
    np.testing.assert_allclose(factors[0].T @ factors[1], small[0].T @ small[1], atol=1e-5)
