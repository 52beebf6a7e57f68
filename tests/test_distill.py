"""FMLM distillation (SPEC §5) against an exact model whose flow is known.

For a finite dataset {x^m} the optimal denoiser is the posterior mean
D_t(x) = Σ_m p(m | x_t = x)·onehot(x^m), p ∝ exp(t·⟨x, onehot(x^m)⟩/(1−t)²). Integrating
dx/dt = (D_t(x) − x)/(1−t) gives the exact flow map X_{s,t}, hence the exact two-time
denoiser δ_{s,t}(x) = (X_{s,t}(x) − ((1−t)/(1−s))·x)·(1−s)/(t−s). Its times are given
in t directly (an identity schedule, dτ/dt = 1), so the targets are checked without
spline error; the schedule's dτ/dt has its own tests.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from conftest import posterior_mean, randomize, rk4_flow, skip_or_fail, tiny_model_config

from fmlm_jax import interpolant, kernels
from fmlm_jax import model as model_lib
from fmlm_jax.model import DiT, init_params, log_probs
from fmlm_jax.objectives import distill
from fmlm_jax.objectives.distill import targets
from fmlm_jax.schedule import Schedule

DATA = np.array([[0, 1, 2], [3, 4, 0], [1, 1, 4], [2, 0, 3]])  # M = 4 sequences, L = 3
K = 5
RK4_STEPS = 200


def exact_denoiser(x, t):
    """Posterior mean D_t(x) (B, L, K) over DATA; t (B,) < 1."""
    return posterior_mean(x, t, DATA, K)


def exact_flow(x, s, t):
    """X_{s,t}(x) by RK4 on dx/dt = (D_t(x) − x)/(1 − t)."""
    return rk4_flow(exact_denoiser, x, s, t, RK4_STEPS)


def exact_log_delta(x, s, t):
    """log δ_{s,t}(x); δ_{s,s} = D_s (the t → s limit)."""
    rows = lambda v: v[:, None, None]  # noqa: E731
    same = jnp.abs(t - s) < 1e-6
    t_safe = jnp.where(same, s + 1e-3, t)
    delta = (exact_flow(x, s, t_safe) - rows((1 - t_safe) / (1 - s)) * x) * rows(
        (1 - s) / (t_safe - s))
    delta = jnp.where(rows(same), exact_denoiser(x, s), delta)
    return jnp.log(jnp.clip(delta, 1e-30, None))


def noisy_points(s, seed=0):
    rng = np.random.default_rng(seed)
    tokens = DATA[rng.integers(0, len(DATA), len(s))]
    eps = rng.standard_normal((len(s), DATA.shape[1], K)).astype(np.float32)
    return interpolant.noisy(jnp.asarray(tokens), jnp.asarray(s), jnp.asarray(eps))


S = jnp.array([0.2, 0.45, 0.6, 0.3], jnp.float32)
U = jnp.array([0.35, 0.55, 0.7, 0.5], jnp.float32)
T = jnp.array([0.5, 0.65, 0.8, 0.7], jnp.float32)


def test_exact_flow_map_boundary_and_semigroup():
    x = noisy_points(S)
    np.testing.assert_allclose(exact_flow(x, S, S), x, atol=1e-6)
    direct = exact_flow(x, S, T)
    composed = exact_flow(exact_flow(x, S, U), U, T)
    np.testing.assert_allclose(composed, direct, atol=2e-5)
    # The two-time denoiser reconstructs the map and lies on the simplex.
    delta = jnp.exp(exact_log_delta(x, S, T))
    np.testing.assert_allclose(interpolant.flow_map(x, delta, S, T), direct, atol=2e-5)
    np.testing.assert_allclose(delta.sum(-1), 1.0, atol=1e-4)
    assert float(delta.min()) > -1e-5


def test_psd_target_equals_the_exact_two_time_denoiser():
    x = noisy_points(S, seed=1)
    target = targets.psd_target(exact_log_delta, x, S, U, T, S, U, T)
    expected = jnp.exp(exact_log_delta(x, S, T))
    np.testing.assert_allclose(target, expected, atol=2e-4)
    assert float(jnp.abs(expected - exact_denoiser(x, S)).max()) > 0.05  # not trivially D_s


def test_lsd_target_equals_the_exact_two_time_denoiser():
    x = noisy_points(S, seed=2)

    def log_d(x, s, t):  # D_t as a log-denoiser evaluated on the diagonal
        return jnp.log(jnp.clip(exact_denoiser(x, t), 1e-30, None))

    log_p, target = targets.lsd_target(exact_log_delta, log_d, x, S, T, S, T, jnp.ones_like(T))
    np.testing.assert_allclose(target, jnp.exp(log_p), atol=5e-4)
    np.testing.assert_allclose(target.sum(-1), 1.0, atol=1e-5)


def test_esd_target_equals_the_exact_two_time_denoiser():
    x = noisy_points(S, seed=3)
    delta, target = targets.esd_target(exact_log_delta, exact_denoiser(x, S), x, S, T, S, T,
                                       jnp.ones_like(S))
    np.testing.assert_allclose(target, delta, atol=5e-4)


# The same exact model with network time τ = t² (t = √τ, dτ/dt = 2t): every chain-rule factor
# of the LSD/ESD targets now matters (with τ = t a wrong or missing dτ/dt goes unnoticed).


def exact_log_delta_tau(x, tau_s, tau_t):
    return exact_log_delta(x, jnp.sqrt(tau_s), jnp.sqrt(tau_t))


def test_lsd_target_with_a_non_identity_schedule():
    x = noisy_points(S, seed=2)

    def log_d(x, tau_s, tau_t):  # D_t of the network time τ_t = t²
        return jnp.log(jnp.clip(exact_denoiser(x, jnp.sqrt(tau_t)), 1e-30, None))

    log_p, target = targets.lsd_target(exact_log_delta_tau, log_d, x, S**2, T**2, S, T, 2.0 * T)
    np.testing.assert_allclose(target, jnp.exp(log_p), atol=5e-4)
    _, wrong = targets.lsd_target(exact_log_delta_tau, log_d, x, S**2, T**2, S, T, 2.0 * S)
    assert float(jnp.abs(wrong - jnp.exp(log_p)).max()) > 5e-3  # dτ/dt at s is detectably wrong


def test_esd_target_with_a_non_identity_schedule():
    x = noisy_points(S, seed=3)
    delta, target = targets.esd_target(exact_log_delta_tau, exact_denoiser(x, S), x, S**2, T**2, S, T,
                                       2.0 * S)
    np.testing.assert_allclose(target, delta, atol=5e-4)
    _, wrong = targets.esd_target(exact_log_delta_tau, exact_denoiser(x, S), x, S**2, T**2, S, T,
                                  1.0 / (2.0 * S))
    assert float(jnp.abs(wrong - delta).max()) > 5e-3  # dividing by dτ/dt is detectably wrong


def test_esd_target_is_zero_coefficient_on_boundary_rows():
    x = noisy_points(S[:2])
    d_s = exact_denoiser(x, S[:2])
    t = jnp.array([1.0, 1.0])
    _, target = targets.esd_target(exact_log_delta, d_s, x, S[:2], jnp.array([0.9, 0.9]),
                                   S[:2], t, jnp.ones(2))
    np.testing.assert_allclose(target, d_s)  # finite: no division by 1 − t = 0


# ----------------------------------------------------- jvp terms vs finite differences


@pytest.fixture(scope="module")
def two_time_net():
    cfg = tiny_model_config(two_time=True)
    params = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))

    def log_delta(x, tau_s, tau_t):
        return log_probs(DiT(cfg).apply({"params": params}, x, tau_s, tau_t))

    return cfg, log_delta


def test_time_jvp_matches_central_differences(two_time_net):
    cfg, log_delta = two_time_net
    x = jax.random.normal(jax.random.key(2), (3, 4, cfg.vocab_size))
    tau_s, tau_t = jnp.array([0.1, 0.3, 0.5]), jnp.array([0.4, 0.6, 0.9])
    _, jvp = targets.dlog_delta_dtau_t(log_delta, x, tau_s, tau_t)
    h = 1e-2
    fd = (log_delta(x, tau_s, tau_t + h) - log_delta(x, tau_s, tau_t - h)) / (2 * h)
    assert float(jnp.abs(jvp).max()) > 1e-2  # a real signal, not zero
    np.testing.assert_allclose(jvp, fd, atol=2e-3 * float(jnp.abs(jvp).max()) + 1e-4)


def test_flow_jvp_matches_central_differences(two_time_net):
    cfg, log_delta = two_time_net
    x = jax.random.normal(jax.random.key(3), (3, 4, cfg.vocab_size))
    d = jax.nn.softmax(jax.random.normal(jax.random.key(4), x.shape), -1)
    tau_s, tau_t = jnp.array([0.1, 0.3, 0.5]), jnp.array([0.4, 0.6, 0.9])
    dtau_ds = jnp.array([0.5, 2.0, 1.0])
    vel = (d - x) / 0.7
    _, jvp = targets.dlog_delta_along_flow(log_delta, x, tau_s, tau_t, dtau_ds, vel)
    h = 1e-2
    plus = log_delta(x + h * vel, tau_s + h * dtau_ds, tau_t)
    minus = log_delta(x - h * vel, tau_s - h * dtau_ds, tau_t)
    fd = (plus - minus) / (2 * h)
    assert float(jnp.abs(jvp).max()) > 1e-2
    np.testing.assert_allclose(jvp, fd, atol=2e-3 * float(jnp.abs(jvp).max()) + 1e-4)


# ----------------------------------------------------- rows, sparsemax, init, loss


@pytest.mark.parametrize("n,expected", [(512, (256, 8, 248)), (128, (64, 2, 62)), (10, (5, 0, 5))])
def test_row_split_matches_spec(n, expected):
    assert distill.split_rows(n, 0.5, 32) == expected


def _distill_config(method="psd", **overrides):
    d = dict(method=method, use_teacher=True, diagonal_fraction=0.5, boundary_prob=4.0,
             offdiag_sampling="uniform_diff", use_mse_loss_psd=False,
             rescale_offdiag_loss_psd=False, use_ema_for_psd_target=False,
             use_teacher_for_D_t_lsd=False, entmax_temp_lsd=2.0)
    d.update(overrides)
    return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("sampling", ["uniform_diff", "uniform_st"])
def test_sampled_times_are_ordered_and_laid_out(sampling):
    cfg = _distill_config(offdiag_sampling=sampling)
    plan = distill.draw_plan(jax.random.key(0), 64, ml_collections.ConfigDict(dict(distill=cfg)))
    tau_s, tau_u, tau_t = (np.asarray(plan[k]) for k in ("tau_s", "tau_u", "tau_t"))
    n_diag, n_bnd, _ = distill.split_rows(64, 0.5, 4.0)
    np.testing.assert_array_equal(tau_s[:n_diag], tau_t[:n_diag])
    np.testing.assert_array_equal(tau_s[n_diag:n_diag + n_bnd], 0.0)
    np.testing.assert_array_equal(tau_t[n_diag:n_diag + n_bnd], 1.0)
    assert np.all(tau_s <= tau_t) and np.all((0 <= tau_s) & (tau_t <= 1))
    np.testing.assert_allclose(tau_u, (tau_s + tau_t) / 2)


@pytest.mark.parametrize("sampling", ["uniform_diff", "uniform_st"])
def test_times_follow_their_distributions(sampling):
    # SPEC §5 by distribution, over many draws of a 64-row plan (P = 4: 32 / 8 / 24 rows).
    cfg = ml_collections.ConfigDict(dict(distill=_distill_config(offdiag_sampling=sampling)))
    plans = [distill.draw_plan(jax.random.key(seed), 64, cfg) for seed in range(150)]
    tau_s = np.concatenate([np.asarray(p["tau_s"])[None] for p in plans]).astype(np.float64)
    tau_t = np.concatenate([np.asarray(p["tau_t"])[None] for p in plans]).astype(np.float64)
    assert distill.split_rows(64, 0.5, 4.0) == (32, 8, 24)
    diag, off = slice(0, 32), slice(40, 64)
    # Diagonal rows: antithetic, one τ in each of the 32 strata, uniform within its stratum.
    strata = np.sort(np.floor(tau_s[:, diag] * 32).astype(int), axis=1)
    np.testing.assert_array_equal(strata, np.tile(np.arange(32), (len(plans), 1)))
    assert scipy.stats.kstest(tau_s[:, diag].ravel(), "uniform").pvalue > 1e-3
    # Boundary rows are exactly (0, 1).
    assert np.all(tau_s[:, 32:40] == 0.0) and np.all(tau_t[:, 32:40] == 1.0)
    gap, start = tau_t[:, off].ravel() - tau_s[:, off].ravel(), tau_s[:, off].ravel()
    if sampling == "uniform_diff":  # the gap is U(0, 1); τ_s given the gap is U(0, 1 − gap)
        assert scipy.stats.kstest(gap, "uniform").pvalue > 1e-3
        assert scipy.stats.kstest(start / (1 - gap), "uniform").pvalue > 1e-3
    else:  # two sorted uniforms: the gap has density 2(1 − g), CDF 1 − (1 − g)²
        assert scipy.stats.kstest(gap, lambda g: 1 - (1 - g) ** 2).pvalue > 1e-3
        assert scipy.stats.kstest(gap, "uniform").pvalue < 1e-6  # the two are told apart


def test_sparsemax_projects_onto_the_simplex():
    z = jax.random.normal(jax.random.key(0), (50, 7))
    p = targets.sparsemax(z)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    assert float(p.min()) >= 0.0
    # A point already on the simplex is its own projection; and the projection is the
    # closest simplex point: no random simplex point is closer.
    q = jax.nn.softmax(z)
    np.testing.assert_allclose(targets.sparsemax(q), q, atol=1e-6)
    others = jax.random.dirichlet(jax.random.key(1), jnp.ones(7), (200,))
    best = jnp.sum((p - z) ** 2, -1)
    assert bool(jnp.all(best[:, None] <= jnp.sum((others[None] - z[:, None]) ** 2, -1) + 1e-6))


def test_student_starts_as_the_teacher():
    teacher_cfg = tiny_model_config()
    teacher = randomize(init_params(teacher_cfg, jax.random.key(0)), jax.random.key(1))
    student_cfg = tiny_model_config(two_time=True)
    student = distill.init_student(teacher, student_cfg, jax.random.key(2))
    np.testing.assert_array_equal(student["sigma_map_prime"]["mlp_2"]["kernel"], 0.0)
    assert float(jnp.abs(student["sigma_map_prime"]["mlp_0"]["kernel"]).max()) > 0
    x = jax.random.normal(jax.random.key(3), (2, 5, teacher_cfg.vocab_size))
    tau_s, tau_t = jnp.array([0.2, 0.7]), jnp.array([0.9, 0.8])
    a = DiT(student_cfg).apply({"params": student}, x, tau_s, tau_t)
    b = DiT(teacher_cfg).apply({"params": teacher}, x, tau_s)
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="two-time"):
        distill.init_student(teacher, teacher_cfg, jax.random.key(2))


# Each variant compiles its own loss with the real DiT (5–10 s on CPU): one in the default set
# (the NumPy assembly above checks every variant's value), all with -m slow.
@pytest.mark.parametrize("method,use_teacher", [
    ("psd", True),
    pytest.param("lsd", False, marks=pytest.mark.slow),
    pytest.param("esd", True, marks=pytest.mark.slow),
    pytest.param("psd", False, marks=pytest.mark.slow),
    pytest.param("lsd", True, marks=pytest.mark.slow),
    pytest.param("esd", False, marks=pytest.mark.slow),
])
def test_distill_loss_runs_and_has_gradient(method, use_teacher):
    teacher_cfg = tiny_model_config(n_blocks=1)  # one block: compile time dominates here
    teacher = randomize(init_params(teacher_cfg, jax.random.key(0)), jax.random.key(1))
    student_cfg = tiny_model_config(two_time=True, n_blocks=1)
    student = distill.init_student(teacher, student_cfg, jax.random.key(2))
    config = ml_collections.ConfigDict(
        dict(model=student_cfg, distill=_distill_config(method, use_teacher=use_teacher)))
    tokens = jax.random.randint(jax.random.key(3), (8, 4), 0, teacher_cfg.vocab_size)
    fn = jax.jit(jax.value_and_grad(
        lambda p: distill.distill_loss(p, {"tokens": tokens}, jax.random.key(4), config,
                                       teacher if use_teacher else None), has_aux=True))
    (loss, metrics), grads = fn(student)
    assert np.isfinite(float(loss)) and set(metrics) == {"loss", "diag_loss", "offdiag_loss", "rows_diagonal",
                                                    "rows_boundary", "rows_offdiagonal"}
    norms = [float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0
    if method == "psd" and use_teacher:
        # At initialisation δ_{s,t} = D_s^teacher on the diagonal: its loss is the
        # teacher's own entropy, and the student's prediction equals the target there.
        assert float(metrics["diag_loss"]) > 0


def test_distill_loss_errors():
    cfg = ml_collections.ConfigDict(dict(model=tiny_model_config(two_time=True),
                                         distill=_distill_config("nope")))
    tokens = jnp.zeros((4, 3), jnp.int32)
    with pytest.raises(ValueError, match="distill.method"):
        distill.distill_loss(None, {"tokens": tokens}, jax.random.key(0), cfg)
    cfg.distill.method = "psd"
    with pytest.raises(ValueError, match="no teacher_params"):
        distill.distill_loss(None, {"tokens": tokens}, jax.random.key(0), cfg)


# ------------------------------------------------------------------ projected noise (SPEC §10)


@pytest.mark.parametrize("method,use_teacher,use_ema", [
    # three networks (student, teacher, EMA target) drawn jointly; the noise's covariance is
    # in the default suite (tests/test_interpolant.py), the loss statistics here
    pytest.param("psd", True, True, marks=pytest.mark.slow),
    pytest.param("lsd", False, False, marks=pytest.mark.slow),
    pytest.param("esd", True, False, marks=pytest.mark.slow),
])
def test_projected_distill_loss_has_the_dense_statistics(method, use_teacher, use_ema):
    teacher_cfg = tiny_model_config(vocab_size=24, hidden_size=8, n_heads=2, n_blocks=1, cond_dim=8)
    teacher = randomize(init_params(teacher_cfg, jax.random.key(0)), jax.random.key(1))
    student_cfg = tiny_model_config(vocab_size=24, hidden_size=8, n_heads=2, n_blocks=1, cond_dim=8,
                                    two_time=True)
    base = distill.init_student(teacher, student_cfg, jax.random.key(2))
    # Student and EMA differ from the teacher (and each other), E included.
    student = randomize(base, jax.random.key(3))
    ema = jax.tree_util.tree_map(lambda a, b: 0.5 * (a + b), base, student)
    tokens = jax.random.randint(jax.random.key(4), (8, 4), 0, teacher_cfg.vocab_size)

    def losses(projected):
        config = ml_collections.ConfigDict(dict(
            model=student_cfg, flm=dict(projected_noise=projected),
            distill=_distill_config(method, use_teacher=use_teacher, use_ema_for_psd_target=use_ema)))
        fn = lambda key: distill.distill_loss(  # noqa: E731
            student, {"tokens": tokens}, key, config, teacher if use_teacher else None, ema)[0]
        return np.asarray(jax.jit(jax.vmap(fn))(jax.random.split(jax.random.key(5), 600)))

    dense, projected = losses(False), losses(True)
    assert np.all(np.isfinite(projected))
    se = np.sqrt(dense.var() / len(dense) + projected.var() / len(projected))
    assert abs(dense.mean() - projected.mean()) < 4 * se, (dense.mean(), projected.mean(), se)
    assert 0.75 < projected.var() / dense.var() < 1.33, projected.var() / dense.var()


# ----------------------------------------------------- the loss, assembled independently
# SPEC §5 written out in NumPy (float64) around a tiny deterministic stand-in network,
# log δ(x; τ_s, τ_t) = log_softmax(x·W + τ_s·a + τ_t·b + c) (a one-time teacher has no b),
# whose time derivatives are known in closed form. The package's loss is run with the same
# stand-in patched in for the DiT, so the comparison checks how the loss is put together:
# which network sees which state at which times, the targets, chain-rule factors, masks,
# the row kinds and the reduction.

SK, SL = 7, 3  # stand-in vocabulary and length


def _stand_in_params(seed, two_time=True):
    rng = np.random.default_rng(seed)
    p = {"W": rng.normal(0, 0.6, (SK, SK)), "a": rng.normal(0, 1.5, SK), "c": rng.normal(0, 0.5, SK)}
    p["b"] = rng.normal(0, 1.5, SK) if two_time else np.zeros(SK)
    return p


def _logits_np(p, x, tau_s, tau_t):
    return x @ p["W"] + tau_s[:, None, None] * p["a"] + tau_t[:, None, None] * p["b"] + p["c"]


def _log_softmax_np(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _entmax_np(z, alpha):
    """α-entmax of each row by root finding (scipy brentq), an independent solve."""
    out = np.zeros_like(z)
    for idx in np.ndindex(z.shape[:-1]):
        x = (alpha - 1.0) * z[idx]
        theta = scipy.optimize.brentq(
            lambda th, x=x: np.sum(np.maximum(x - th, 0.0) ** (1.0 / (alpha - 1.0))) - 1.0,
            x.max() - 1.0, x.max())
        out[idx] = np.maximum(x - theta, 0.0) ** (1.0 / (alpha - 1.0))
    return out


def numpy_distill(student, teacher, ema, tokens, mask, tau_s, tau_u, tau_t, eps, n_diag, dc):
    """{loss, diag_loss, offdiag_loss} of SPEC §5 in float64, for the stand-in network."""
    sched = Schedule(SK)
    s, u, t = (np.asarray(sched.tau_to_t(x), np.float64) for x in (tau_s, tau_u, tau_t))
    onehot = np.eye(SK)[tokens]
    r = lambda v: v[:, None, None]  # noqa: E731
    x = r(1 - s) * eps + r(s) * onehot

    def log_delta(p, x, ts, tt):
        return _log_softmax_np(_logits_np(p, x, ts, tt))

    def flow_map(x, delta, s, t):
        return r((1 - t) / (1 - s + 1e-8)) * x + r((t - s) / (1 - s + 1e-8)) * delta

    mse = dc.method == "psd" and dc.use_mse_loss_psd
    # Diagonal rows: towards D_s (teacher) or the one-hot data.
    d = slice(0, n_diag)
    log_diag = log_delta(student, x[d], tau_s[d], tau_s[d])
    target = np.exp(log_delta(teacher, x[d], tau_s[d], tau_s[d])) if teacher else onehot[d]
    diag = ((np.exp(log_diag) - target) ** 2).sum(-1) if mse else -(target * log_diag).sum(-1)
    # The rest: boundary and off-diagonal rows, the method's target.
    o = slice(n_diag, None)
    xo, ts, tu, tt, so, uo, to = x[o], tau_s[o], tau_u[o], tau_t[o], s[o], u[o], t[o]
    log_p = log_delta(student, xo, ts, tt)
    keep = np.ones(len(to), bool)
    if dc.method == "psd":
        net = ema if dc.use_ema_for_psd_target else student
        first = np.exp(log_delta(net, xo, ts, tu))
        second = np.exp(log_delta(net, flow_map(xo, first, so, uo), tu, tt))
        lam = r((1 - to) * (uo - so) / ((1 - uo) * (to - so) + 1e-8))
        target = lam * first + (1 - lam) * second
        off = ((np.exp(log_p) - target) ** 2).sum(-1) if dc.use_mse_loss_psd else -(target * log_p).sum(-1)
        if dc.rescale_offdiag_loss_psd:
            off = off * (((to - so) / (1 - so + 1e-8)) ** 2)[:, None]
    elif dc.method == "lsd":
        delta = np.exp(log_p)
        dlogp_dtau_t = student["b"] - (delta * student["b"]).sum(-1, keepdims=True)
        d_delta_dt = delta * dlogp_dtau_t * r(sched.dtau_dt(to))
        x_t = flow_map(xo, delta, so, to)
        d_net = teacher if (teacher and dc.use_teacher_for_D_t_lsd) else student
        d_t = np.exp(log_delta(d_net, x_t, tt, tt))
        raw = d_t - r((to - so) * (1 - to) / (1 - so + 1e-8)) * d_delta_dt
        target = _entmax_np(raw, dc.entmax_temp_lsd)
        off = -(target * log_p).sum(-1)
    else:  # esd
        d_s = np.exp(log_delta(teacher, xo, ts, ts) if teacher else log_delta(student, xo, ts, ts))
        velocity = (d_s - xo) / r(1 - so)
        dlogits = velocity @ student["W"] + r(sched.dtau_dt(so)) * student["a"]
        delta = np.exp(log_p)
        dlog_delta_ds = dlogits - (delta * dlogits).sum(-1, keepdims=True)
        keep = to < 1.0
        coeff = np.where(keep, (1 - so) * (to - so) / np.where(keep, 1 - to, 1.0), 0.0)
        target = d_s + r(coeff) * delta * dlog_delta_ds
        off = ((delta - target) ** 2).sum(-1)
    off_mask = mask[o] * keep[:, None]
    per_token = np.concatenate([diag, off])
    full_mask = np.concatenate([mask[d], off_mask])
    return {"loss": (per_token * full_mask).sum() / full_mask.sum(),
            "diag_loss": (diag * mask[d]).sum() / mask[d].sum(),
            "offdiag_loss": (off * off_mask).sum() / off_mask.sum()}


@pytest.fixture
def stand_in_network(monkeypatch):
    """Patches the DiT out of the loss: `model.log_denoiser` becomes the stand-in; records
    (parameter set, train flag) of every network the loss builds."""
    built = []

    def fake_log_denoiser(params, model_config, *, train=False, rng=None, embedded=False):
        assert not embedded
        built.append((params["name"], train))
        p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items() if k != "name"}

        def log_delta(z, tau_s, tau_t=None):
            tau_t = tau_s if tau_t is None else tau_t  # one-time: b = 0
            logits = z @ p["W"] + tau_s[:, None, None] * p["a"] + tau_t[:, None, None] * p["b"] + p["c"]
            return jax.nn.log_softmax(logits, axis=-1)

        return log_delta

    def fake_denoiser_parts(params, model_config, *, train=False, rng=None, attention_impl=None):
        # The same stand-in split as the chunked loss reads it: E = W, features = x·W + τ terms
        # + c, scores = the features themselves (no cap).
        built.append((params["name"], train))
        p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items() if k != "name"}

        def trunk(h, tau_s, tau_t=None):
            tau_t = tau_s if tau_t is None else tau_t
            return h + tau_s[:, None, None] * p["a"] + tau_t[:, None, None] * p["b"] + p["c"]

        return model_lib.DenoiserParts(p["W"], trunk, lambda f: f)

    monkeypatch.setattr(model_lib, "log_denoiser", fake_log_denoiser)
    monkeypatch.setattr(model_lib, "denoiser_parts", fake_denoiser_parts)
    return built


def _rows_and_noise(seed=0):
    rng = np.random.default_rng(seed)
    n_diag = 3
    # 3 diagonal rows, 2 boundary rows (0, 1), 4 off-diagonal rows; τ_u the τ-midpoint.
    tau_s = np.array([0.3, 0.55, 0.8, 0.0, 0.0, 0.1, 0.25, 0.4, 0.05])
    tau_t = np.array([0.3, 0.55, 0.8, 1.0, 1.0, 0.5, 0.9, 0.7, 0.95])
    tau_u = 0.5 * (tau_s + tau_t)
    tokens = rng.integers(0, SK, (len(tau_s), SL))
    mask = (rng.random(tokens.shape) < 0.8).astype(np.float64)
    mask[:, 0] = 1.0
    eps = rng.standard_normal((*tokens.shape, SK))
    return tokens, mask, (tau_s, tau_u, tau_t), eps, n_diag


DISTILL_VARIANTS = [
    dict(method="psd", use_teacher=True),
    dict(method="psd", use_teacher=False),
    dict(method="psd", use_teacher=True, use_mse_loss_psd=True),
    dict(method="psd", use_teacher=False, use_mse_loss_psd=True, rescale_offdiag_loss_psd=True),
    dict(method="psd", use_teacher=True, use_ema_for_psd_target=True),
    dict(method="lsd", use_teacher=True),
    dict(method="lsd", use_teacher=False),
    dict(method="lsd", use_teacher=True, use_teacher_for_D_t_lsd=True),
    dict(method="lsd", use_teacher=False, entmax_temp_lsd=1.5),
    dict(method="esd", use_teacher=True),
    dict(method="esd", use_teacher=False),
]


def _assembly_cases():
    """Every variant chunked (the default path) and unchunked; by default the unchunked path
    runs once per method (with a teacher), its other variants under `slow`."""
    for variant in DISTILL_VARIANTS:
        name = "-".join(f"{k}={variant[k]}" if k != "method" else variant[k] for k in variant)
        yield pytest.param(variant, 6, id=f"{name}-chunked")
        basic = variant == dict(method=variant["method"], use_teacher=True)
        yield pytest.param(variant, 0, id=f"{name}-unchunked", marks=() if basic else pytest.mark.slow)


@pytest.mark.parametrize("variant,chunk_size", list(_assembly_cases()))
def test_distill_loss_equals_the_numpy_assembly_of_the_spec(variant, chunk_size, stand_in_network):
    # chunk_size 6 tokens: 2 positions of the 3 diagonal rows (two chunks of the 3 positions,
    # the last one padded), 1 position of the 6 off-diagonal rows (three chunks).
    dc = _distill_config(**variant, chunk_size=chunk_size)
    config = ml_collections.ConfigDict(dict(model=tiny_model_config(vocab_size=SK, two_time=True),
                                            distill=dc))
    student = _stand_in_params(0)
    teacher = _stand_in_params(1, two_time=False) if dc.use_teacher else None
    ema = _stand_in_params(2)
    tokens, mask, times, eps, n_diag = _rows_and_noise()
    want = numpy_distill(student, teacher, ema, tokens, mask, *times, eps, n_diag, dc)

    named = lambda p, name: None if p is None else dict(p, name=name)  # noqa: E731
    got = distill.distill_loss_at(
        named(student, "student"), jnp.asarray(tokens), jnp.asarray(mask, jnp.float32),
        tuple(jnp.asarray(x, jnp.float32) for x in times), jnp.asarray(eps, jnp.float32), n_diag,
        jax.random.key(0), config, named(teacher, "teacher"), named(ema, "ema"))[1]
    for key in ("loss", "diag_loss", "offdiag_loss"):
        assert float(got[key]) == pytest.approx(want[key], rel=2e-4, abs=1e-6), key
    # Who was asked for what: the teacher and EMA targets in eval mode, the student in train mode.
    for name, train_mode in stand_in_network:
        assert train_mode == (name == "student"), stand_in_network
    assert ("ema", False) in stand_in_network if dc.use_ema_for_psd_target else True
    n = len(tokens)
    counts = [round(float(got[f"rows_{k}"]) * n) for k in ("diagonal", "boundary", "offdiagonal")]
    assert counts == [3, 2, 4]


def test_learnable_loss_weighting_reweights_every_token_of_the_distillation_loss():
    # ℓ → e^{−w(τ_s)}·ℓ + w(τ_s) (SPEC §3.9). With the weighting's last layer at weight 0 and
    # bias c, w ≡ c: the weighted loss must be e^{−c}·loss + c of the same student without it.
    teacher_cfg = tiny_model_config(n_blocks=1)
    teacher = randomize(init_params(teacher_cfg, jax.random.key(0)), jax.random.key(1))
    llw_cfg = tiny_model_config(two_time=True, n_blocks=1, learnable_loss_weighting=True)
    plain_cfg = tiny_model_config(two_time=True, n_blocks=1)
    student = distill.init_student(teacher, llw_cfg, jax.random.key(2))
    c = 0.7
    student["learnable_loss_weighting"]["mlp_2"]["bias"] = jnp.full((1,), c)
    plain = {k: v for k, v in student.items() if k != "learnable_loss_weighting"}
    tokens, mask, times, _, n_diag = _rows_and_noise()
    tokens = jnp.asarray(tokens % teacher_cfg.vocab_size)
    noise = jax.random.normal(jax.random.key(3), (*tokens.shape, teacher_cfg.vocab_size))
    times = tuple(jnp.asarray(x, jnp.float32) for x in times)

    def metrics(params, model_cfg):
        config = ml_collections.ConfigDict(dict(model=model_cfg, distill=_distill_config("psd")))
        return distill.distill_loss_at(params, tokens, jnp.asarray(mask), times, noise, n_diag,
                                       jax.random.key(4), config, teacher, train=False)[1]

    weighted, unweighted = metrics(student, llw_cfg), metrics(plain, plain_cfg)
    assert float(weighted["loss"]) == pytest.approx(np.exp(-c) * float(unweighted["loss"]) + c, rel=1e-5)
    assert float(weighted["diag_loss"]) == pytest.approx(float(unweighted["diag_loss"]), rel=1e-5)


# ----------------------------------------------------- chunked over tokens (issue #16)
# distill.chunk_size > 0 computes every K-wide tensor chunk by chunk of tokens from the
# networks' features; it must be today's unchunked loss (chunk_size=0) to float32 rounding,
# value and gradient, with dropout on and the real DiT.


def _chunk_case(projected: bool, dropout: float = 0.1):
    kw = dict(vocab_size=24, hidden_size=8, n_heads=2, cond_dim=8, n_blocks=1, dropout=dropout)
    teacher_cfg = tiny_model_config(**kw)
    teacher = randomize(init_params(teacher_cfg, jax.random.key(0)), jax.random.key(1))
    student_cfg = tiny_model_config(two_time=True, **kw)
    student = randomize(distill.init_student(teacher, student_cfg, jax.random.key(2)), jax.random.key(3))
    ema = jax.tree_util.tree_map(lambda a: 0.9 * a, student)
    tokens, mask, times, _, n_diag = _rows_and_noise()
    return (student_cfg, student, teacher, ema, jnp.asarray(tokens % 24), jnp.asarray(mask, jnp.float32),
            tuple(jnp.asarray(x, jnp.float32) for x in times), n_diag)


def _loss_and_grad(case, variant, chunk_size, projected, attention_impl="xla"):
    student_cfg, student, teacher, ema, tokens, mask, times, n_diag = case
    model = ml_collections.ConfigDict(dict(student_cfg.items()))
    model.attention_impl = attention_impl
    dc = _distill_config(**variant, chunk_size=chunk_size)
    config = ml_collections.ConfigDict(dict(model=model, distill=dc, flm=dict(projected_noise=projected)))
    width = distill.noise_width(student, config, teacher, ema)
    noise = jax.random.normal(jax.random.key(5), (*tokens.shape, width))

    def loss(p):
        return distill.distill_loss_at(p, tokens, mask, times, noise, n_diag, jax.random.key(6), config,
                                       teacher if dc.use_teacher else None, ema)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(student)
    return value, metrics, grads


def _max_abs(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


@pytest.mark.parametrize("variant,projected", [
    # slow: the chunked losses by default are the assembly test's (every variant, chunked)
    pytest.param(dict(method="lsd"), True, marks=pytest.mark.slow),
    pytest.param(dict(method="psd"), False, marks=pytest.mark.slow),
    pytest.param(dict(method="esd", use_teacher=False), False, marks=pytest.mark.slow),
    pytest.param(dict(method="psd", use_teacher=False, use_mse_loss_psd=True, rescale_offdiag_loss_psd=True),
                 True, marks=pytest.mark.slow),
    pytest.param(dict(method="psd", use_ema_for_psd_target=True), False, marks=pytest.mark.slow),
    pytest.param(dict(method="lsd", use_teacher=False, entmax_temp_lsd=1.5), False, marks=pytest.mark.slow),
    pytest.param(dict(method="lsd", use_teacher_for_D_t_lsd=True), False, marks=pytest.mark.slow),
    pytest.param(dict(method="esd"), True, marks=pytest.mark.slow),
], ids=lambda v: v if isinstance(v, str) else None)
def test_chunked_loss_and_gradient_equal_the_unchunked_ones(variant, projected):
    case = _chunk_case(projected)
    value, metrics, grads = _loss_and_grad(case, variant, 0, projected)
    # 6 tokens a chunk: the 3 diagonal rows 2 positions at a time (padded), the 6 others 1.
    value_c, metrics_c, grads_c = _loss_and_grad(case, variant, 6, projected)
    assert float(value) > 0.1
    for key in ("loss", "diag_loss", "offdiag_loss"):
        assert abs(float(metrics[key]) - float(metrics_c[key])) <= 2e-6 * abs(float(metrics[key])), key
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads))
    assert scale > 1e-2 and _max_abs(grads, grads_c) <= 1e-6 * scale


@pytest.mark.slow  # three compiles of the loss and its gradient (~10 s)
@pytest.mark.parametrize("method", ["lsd", "esd"])
def test_lsd_esd_with_a_fused_kernel_take_the_jvp_through_xla(method):
    # tokamax kernels are custom-VJP functions jax.jvp cannot differentiate: the target's jvp
    # runs with XLA attention and the differentiated student pass with the kernel; same loss.
    if kernels.tokamax is None:  # CI (FMLM_JAX_REQUIRE_ASSETS=1) fails instead
        skip_or_fail("needs tokamax (pip install fmlm-jax[kernels])")
    case = _chunk_case(False)
    value, _, grads = _loss_and_grad(case, dict(method=method), 6, False)
    value_k, _, grads_k = _loss_and_grad(case, dict(method=method), 6, False, "xla_chunked")
    assert abs(float(value) - float(value_k)) <= 1e-5 and _max_abs(grads, grads_k) <= 1e-5
    with pytest.raises(ValueError, match="distill.chunk_size"):
        _loss_and_grad(case, dict(method=method), 0, False, "xla_chunked")
