"""The τ ↔ t reparameterization (SPEC §2) against published numbers, the authors' own maps
(tests/fixtures/reference_outputs.npz), an independent quadrature and finite differences."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special

from fmlm_jax.schedule import Schedule, tau_of_t_exact

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OUTPUTS = os.path.join(FIXTURES, "reference_outputs.npz")
VOCABS = (61, 30522, 50258)
TOL = 1e-4  # SPEC §2 / §5 fixture tolerance
DEVICE_TOL = 1e-5  # SPEC §2: on-device map vs the float64 reference spline, in t


@pytest.fixture(scope="module")
def schedules():
    return {k: Schedule(k) for k in VOCABS}


@pytest.fixture(scope="module")
def reference():
    with np.load(OUTPUTS) as d:
        return {k: d[k] for k in d.files if k.startswith("schedule/")}


_JITTED = {}
_CHUNK = 2048


def _dev(schedule_fn, x):
    """Evaluate a Schedule method on the jax (float32, on-device) path; numpy float64 out.

    Inputs are flattened and fed in fixed-size padded chunks to one jitted program per
    method, so every probe set reuses a single compilation (keeps the file fast).
    """
    x = np.asarray(x, np.float32)
    flat = x.reshape(-1)
    key = (id(schedule_fn.__self__), schedule_fn.__name__)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(schedule_fn)
    n_chunks = -(-flat.size // _CHUNK)
    padded = np.zeros(n_chunks * _CHUNK, np.float32)
    padded[: flat.size] = flat
    out = [_JITTED[key](jnp.asarray(c)) for c in padded.reshape(n_chunks, _CHUNK)]
    return np.concatenate([np.asarray(o, np.float64) for o in out])[: flat.size].reshape(x.shape)


def _float32_below_one(n):
    """The n largest float32 values strictly below 1 (1 − 6e-8, 1 − 1.2e-7, …)."""
    one_bits = np.array(1.0, np.float32).view(np.int32)
    return (one_bits - np.arange(1, n + 1, dtype=np.int32)).view(np.float32)


# ---------------------------------------------------------------------------------------------
# (1) SPEC §2 published table values.

TABLE_TAU = [0.0, 1e-4, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]
TABLE_T = {
    30522: [0.0, 0.2617, 0.6312, 0.7359, 0.7735, 0.8045, 0.8281, 0.8450, 0.8676, 1.0],
    50258: [0.0, 0.3087, 0.6465, 0.7438, 0.7792, 0.8087, 0.8314, 0.8477, 0.8695, 1.0],
}


@pytest.mark.parametrize("vocab", [30522, 50258])
def test_spec_table_tau_to_t(schedules, vocab):
    s = schedules[vocab]
    tau = np.array(TABLE_TAU)
    np.testing.assert_allclose(s.tau_to_t(tau), TABLE_T[vocab], rtol=0, atol=TOL)
    np.testing.assert_allclose(_dev(s.tau_to_t, tau), TABLE_T[vocab], rtol=0, atol=TOL)


def test_spec_table_t_to_tau(schedules):
    s = schedules[30522]
    # Published to 3 significant digits.
    t = np.array([0.5, 0.7, 0.8])
    want = np.array([0.00124, 0.0426, 0.456])
    for got in (s.t_to_tau(t), _dev(s.t_to_tau, t)):
        np.testing.assert_allclose(got, want, rtol=5e-3, atol=0)
    t_high = np.array([0.9, 0.91, 0.95, 0.99, 0.999, 1.0])
    for got in (s.t_to_tau(t_high), _dev(s.t_to_tau, t_high)):
        np.testing.assert_allclose(got, 1.0, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (2) The authors' maps on 2001 uniform τ and t, for all three vocabularies.


@pytest.mark.parametrize("vocab", VOCABS)
def test_reference_fixture_maps(schedules, reference, vocab):
    s = schedules[vocab]
    tau, t = reference[f"schedule/K{vocab}/tau"], reference[f"schedule/K{vocab}/t"]
    want_t = reference[f"schedule/K{vocab}/tau_to_t"]
    want_tau = reference[f"schedule/K{vocab}/t_to_tau"]
    np.testing.assert_allclose(s.tau_to_t(tau), want_t, rtol=0, atol=TOL)
    np.testing.assert_allclose(s.t_to_tau(t), want_tau, rtol=0, atol=TOL)
    np.testing.assert_allclose(_dev(s.tau_to_t, tau), want_t, rtol=0, atol=TOL)
    np.testing.assert_allclose(_dev(s.t_to_tau, t), want_tau, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------------
# (3) The on-device map matches the float64 reference spline to 1e-5 in t over float32 τ.


def _float32_probe_set():
    rng = np.random.default_rng(0)
    one_bits = int(np.array(1.0, np.float32).view(np.int32))
    return {
        "dense_uniform": np.linspace(0.0, 1.0, 2001, dtype=np.float32),
        "random_uniform": rng.uniform(0.0, 1.0, 1000).astype(np.float32),
        # Uniform over bit patterns in [0, 1]: every binade of float32 gets equal weight.
        "random_bits": rng.integers(0, one_bits + 1, 1000).astype(np.int32).view(np.float32),
        "log_tiny": np.logspace(-30, -2, 500).astype(np.float32),
        "below_one": _float32_below_one(2000),
        "ends": np.array([0.0, 1.0], np.float32),
    }


@pytest.mark.parametrize("vocab", [30522, 61])
def test_device_tau_to_t_matches_float64_reference(schedules, vocab):
    s = schedules[vocab]
    probes = _float32_probe_set()
    tau32 = np.concatenate(list(probes.values()))
    err_all = np.abs(_dev(s.tau_to_t, tau32) - s.tau_to_t(tau32.astype(np.float64)))
    worst, start = {}, 0
    for name, probe in probes.items():
        err = err_all[start : start + probe.size]
        start += probe.size
        worst[name] = float(err.max())
        assert err.max() <= DEVICE_TOL, (name, float(probe[err.argmax()]), worst[name])
    print(f"K={vocab} worst |device − float64| in t: {worst}")

    ends = np.asarray(s.tau_to_t(jnp.array([0.0, 1.0], jnp.float32)))
    assert ends[0] == 0.0 and ends[1] == 1.0  # τ = 1 → exactly 1
    assert s.tau_to_t(np.array([0.0, 1.0])).tolist() == [0.0, 1.0]


def test_device_last_float32_below_one(schedules):
    # SPEC §2: float32 τ = 1 − 6e-8 gives t ≈ 0.907 (K = 30522), not 1.
    s = schedules[30522]
    tau = _float32_below_one(1)
    assert abs(float(1.0 - tau[0].astype(np.float64)) - 5.96e-8) < 1e-10
    got = _dev(s.tau_to_t, tau)[0]
    assert abs(got - 0.907) < 1e-3
    assert abs(got - float(s.tau_to_t(tau.astype(np.float64))[0])) <= DEVICE_TOL


@pytest.mark.parametrize("vocab", [30522, 61])
def test_device_t_to_tau_matches_float64_reference(schedules, vocab):
    s = schedules[vocab]
    t32 = np.concatenate(
        [np.linspace(0.0, 1.0, 2001, dtype=np.float32), _float32_below_one(500)]
    )
    err = np.abs(_dev(s.t_to_tau, t32) - s.t_to_tau(t32.astype(np.float64)))
    # Output is τ in float32, so allow a few float32 ulps of 1.
    assert err.max() <= 1e-6, (float(t32[err.argmax()]), float(err.max()))


# ---------------------------------------------------------------------------------------------
# (4) The τ(t) construction against an independent adaptive quadrature.


def _tau_by_quad(t, vocab):
    """τ(t) = (K·q − 1)/(K − 1) + (t − 1)·1e-10 with q = ∫ φ(z)·Φ(z + m)^(K−1) dz (adaptive)."""
    m = t / max(1.0 - t, 1e-12)
    log_norm = -0.5 * math.log(2.0 * math.pi)

    def integrand(z):  # φ(z)·Φ(z + m)^(K−1) in log space
        return math.exp(log_norm - 0.5 * z * z + (vocab - 1) * scipy.special.log_ndtr(z + m))

    # Break points at the bulk of φ and around the step of Φ(z + m)^(K−1).
    points = sorted({0.0, -m, 3.0 - m, 4.5 - m, 5.0 - m})
    points = [p for p in points if -40 < p < 40]
    q, _ = scipy.integrate.quad(
        integrand, -40.0, 40.0, points=points, limit=500, epsabs=1e-15, epsrel=1e-12
    )
    return float(np.clip((vocab * q - 1.0) / (vocab - 1.0) + (t - 1.0) * 1e-10, 0.0, 1.0))


QUAD_T = (0.1, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.95)


def test_tau_of_t_exact_closed_form_two_tokens():
    # K = 2: argmax is correct iff ε_c + m > ε_o, so q = Φ(m/√2) and τ = 2q − 1 = erf(m/2).
    t = np.linspace(0.0, 0.99, 199)
    m = t / (1.0 - t)
    want = np.clip(scipy.special.erf(m / 2.0) + (t - 1.0) * 1e-10, 0.0, 1.0)
    np.testing.assert_allclose(tau_of_t_exact(t, 2), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("vocab", [61, 30522, 50258])
def test_tau_of_t_exact_matches_adaptive_quadrature(vocab):
    ours = tau_of_t_exact(np.array(QUAD_T), vocab)
    quad = np.array([_tau_by_quad(t, vocab) for t in QUAD_T])
    if vocab <= 61:
        # The 100-node Gauss–Hermite rule is converged for a small vocabulary.
        np.testing.assert_allclose(ours, quad, rtol=0, atol=1e-8)
        return
    # For large K the step of Φ^(K−1) is narrow and the reference's 100-node Gauss–Hermite
    # rule (SPEC §2, reproduced on purpose) is off by up to ~1e-4 in τ (a few 1e-3 relative at
    # τ ~ 1e-5). Judge it also by the time shift it implies, |Δτ| / (dτ/dt), in t.
    h = 1e-5
    slope = np.array(
        [(_tau_by_quad(t + h, vocab) - _tau_by_quad(t - h, vocab)) / (2 * h) for t in QUAD_T]
    )
    dtau = np.abs(ours - quad)
    shift = dtau / slope
    print(f"K={vocab} Gauss–Hermite vs quad: |Δτ| max {dtau.max():.2e}, t-shift {shift}")
    assert dtau.max() <= 1e-4, dtau
    np.testing.assert_allclose(ours, quad, rtol=5e-3, atol=1e-9)
    assert shift.max() <= 5e-4, shift
    assert shift[quad >= 0.04].max() <= 5e-5, shift  # t ≥ 0.7, where training mass sits


@pytest.mark.parametrize("vocab", VOCABS)
def test_spline_knots_and_round_trip(schedules, vocab):
    s = schedules[vocab]
    # Off the knots, the t → τ spline stays close to the quadrature it interpolates.
    t = np.array([0.31234, 0.52345, 0.71234, 0.80123, 0.84567])
    np.testing.assert_allclose(s.t_to_tau(t), tau_of_t_exact(t, vocab), rtol=0, atol=1e-7)
    # τ → t → τ away from the steep ends, and t → τ → t where τ(t) is not saturated.
    tau = np.linspace(1e-3, 0.999, 5001)
    np.testing.assert_allclose(s.t_to_tau(s.tau_to_t(tau)), tau, rtol=0, atol=1e-9)
    t = np.linspace(0.3, 0.85, 5001)
    np.testing.assert_allclose(s.tau_to_t(s.t_to_tau(t)), t, rtol=0, atol=1e-9)
    # Same on the device path, at float32 precision.
    tau32 = np.linspace(0.01, 0.99, 2001, dtype=np.float32)
    np.testing.assert_allclose(_dev(s.t_to_tau, _dev(s.tau_to_t, tau32)), tau32, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (5) Monotone maps into [0, 1].


@pytest.mark.parametrize("vocab", VOCABS)
def test_monotone_and_in_unit_interval(schedules, vocab):
    s = schedules[vocab]
    grid = np.linspace(0.0, 1.0, 400001)
    tail = 1.0 - np.logspace(-15, -2, 20001)[::-1]
    tiny = np.logspace(-40, -2, 20001)
    for x in (grid, tail, tiny):
        for fn in (s.tau_to_t, s.t_to_tau):
            y = fn(x)
            assert y.min() >= 0.0 and y.max() <= 1.0
            # Non-decreasing up to float64 rounding: ~1 ulp of 1 where τ(t) ≈ 1 − 1e-10·(1 − t).
            assert np.diff(y).min() >= -2.3e-16, (fn.__name__, float(np.diff(y).min()))
    x32 = np.linspace(0.0, 1.0, 2001, dtype=np.float32)
    for fn in (s.tau_to_t, s.t_to_tau):
        y = _dev(fn, x32)
        assert y.min() >= 0.0 and y.max() <= 1.0
        assert np.diff(y).min() >= -1.2e-7, (fn.__name__, float(np.diff(y).min()))  # 1 ulp of 1
    y = _dev(s.tau_to_t, _float32_below_one(2000)[::-1])
    assert np.diff(y).min() >= -1.2e-7


# ---------------------------------------------------------------------------------------------
# (6) dτ/dt.


@pytest.mark.parametrize("vocab", VOCABS)
def test_dtau_dt_finite_differences(schedules, vocab):
    s = schedules[vocab]
    # Stay off t = 0, where K = 30522's clip at τ = 0 is active (and the FD would see 0).
    t = np.linspace(0.01, 0.99, 9803)
    h = 1e-6
    fd = (s.t_to_tau(t + h) - s.t_to_tau(t - h)) / (2 * h)
    got = s.dtau_dt(t)
    err = np.abs(got - fd)
    assert np.all(err <= 1e-6 + 1e-5 * np.abs(fd)), (float(t[err.argmax()]), float(err.max()))
    # Also against the quadrature's own slope at a few times (spline vs the function it fits).
    t0 = np.array([0.5, 0.7, 0.8])
    q_slope = (tau_of_t_exact(t0 + 1e-5, vocab) - tau_of_t_exact(t0 - 1e-5, vocab)) / 2e-5
    np.testing.assert_allclose(s.dtau_dt(t0), q_slope, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("vocab", VOCABS)
def test_dtau_dt_device_matches_numpy(schedules, vocab):
    s = schedules[vocab]
    t32 = np.linspace(0.0, 1.0, 2001, dtype=np.float32)
    ref = s.dtau_dt(t32.astype(np.float64))
    got = _dev(s.dtau_dt, t32)
    err = np.abs(got - ref)
    assert np.all(err <= 1e-6 + 1e-5 * np.abs(ref)), (float(t32[err.argmax()]), float(err.max()))


# ---------------------------------------------------------------------------------------------
# (7) Array kinds, shapes and jit.


def test_array_kinds_shapes_and_jit(schedules):
    s = schedules[30522]
    x = np.array([[0.0, 0.1, 0.5], [0.75, 0.9999, 1.0]])
    for fn in (s.tau_to_t, s.t_to_tau, s.dtau_dt):
        y_np = fn(x)
        assert isinstance(y_np, np.ndarray) and not isinstance(y_np, jax.Array)
        assert y_np.shape == x.shape and y_np.dtype == np.float64
        y_jx = fn(jnp.asarray(x, jnp.float32))
        assert isinstance(y_jx, jax.Array)
        assert y_jx.shape == x.shape and y_jx.dtype == jnp.float32
        y_jit = jax.jit(fn)(jnp.asarray(x, jnp.float32))
        assert isinstance(y_jit, jax.Array) and y_jit.shape == x.shape
        np.testing.assert_allclose(np.asarray(y_jit), np.asarray(y_jx), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(y_jx), y_np, rtol=1e-5, atol=DEVICE_TOL)
    # A scalar Python float goes down the numpy path.
    y = s.tau_to_t(0.5)
    assert not isinstance(y, jax.Array) and np.ndim(y) == 0
    assert abs(float(y) - 0.8045) < TOL

    @jax.jit
    def step(tau):  # a jitted training-step-like use: times drawn in τ, algebra in t
        t = s.tau_to_t(tau)
        return (1.0 - t) * 2.0 + t

    tau = jnp.linspace(0.0, 1.0, 17, dtype=jnp.float32)
    t_ref = s.tau_to_t(np.asarray(tau, np.float64))
    want = (1.0 - t_ref) * 2.0 + t_ref
    np.testing.assert_allclose(np.asarray(step(tau)), want, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# (8) SPEC §5 distillation-time fixtures: τ-triples → (s, u, t).


@pytest.mark.parametrize(
    "vocab,taus,want",
    [
        (30522, (0.2, 0.4, 0.6), (0.76426, 0.79388, 0.81406)),
        (30522, (0.5, 0.625, 0.75), (0.80448, 0.81638, 0.8281)),
        (30522, (0.0, 0.5, 1.0), (0.0, 0.80448, 1.0)),
        (50258, (0.2, 0.4, 0.6), (0.77051, 0.79863, 0.8179)),
    ],
)
def test_spec_distillation_times(schedules, vocab, taus, want):
    s = schedules[vocab]
    np.testing.assert_allclose(s.tau_to_t(np.array(taus)), want, rtol=0, atol=TOL)
    np.testing.assert_allclose(_dev(s.tau_to_t, taus), want, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------------
# (9) Input validation.


@pytest.mark.parametrize("vocab", [1, 0, -5])
def test_vocab_size_too_small_raises(vocab):
    with pytest.raises(ValueError, match="vocab_size"):
        Schedule(vocab)


@pytest.mark.parametrize("vocab", VOCABS)
def test_dtau_dt_is_zero_where_the_map_is_clipped(schedules, vocab):
    s = schedules[vocab]
    t = np.concatenate([np.linspace(0.0, 0.05, 501), [1.0, 1.5]])
    slope = s.dtau_dt(t)
    assert np.all(slope >= 0.0)  # the clipped map never decreases
    assert s.dtau_dt(np.array(1.0)) == 0.0
    flat = s.t_to_tau(t) == 0.0  # clipped at τ = 0: its slope is 0 too
    np.testing.assert_array_equal(slope[flat & (t > 0)], 0.0)
    np.testing.assert_allclose(np.asarray(s.dtau_dt(jnp.asarray(t, jnp.float32))), slope, atol=1e-6)
