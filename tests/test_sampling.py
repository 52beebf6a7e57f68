"""The samplers (SPEC §6) against step-by-step numpy loops, the projected samplers, and guidance
(SPEC §11) on an exact toy model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from conftest import posterior_mean, randomize, rk4_flow, tiny_model_config

from fmlm_jax import interpolant, model, rewards, sampling
from fmlm_jax.model import DiT, init_params
from fmlm_jax.sampling import flm_sample, fmlm_sample
from fmlm_jax.schedule import Schedule

SMALL = dict(vocab_size=40, hidden_size=16, n_heads=2)  # K ≥ d, as in every real model


def denoiser_np(params, cfg, z, tau):
    logits = DiT(cfg).apply({"params": params}, jnp.asarray(z, jnp.float32),
                            jnp.full((z.shape[0],), tau, jnp.float32))
    return np.exp(scipy.special.log_softmax(30 * np.tanh(np.asarray(logits, np.float64) / 30), -1))


@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_euler_sampler_matches_hand_loop(num_steps, random_tiny_params):
    cfg = tiny_model_config()
    params = random_tiny_params(cfg)
    z0 = np.random.default_rng(0).standard_normal((4, 6, cfg.vocab_size)).astype(np.float32)
    ids = np.asarray(flm_sample(params, cfg, jnp.asarray(z0), num_steps))

    tau = np.arange(num_steps + 1) / num_steps
    t = Schedule(cfg.vocab_size).tau_to_t(tau)
    z = z0.astype(np.float64)
    for i in range(num_steps - 1):
        d = denoiser_np(params, cfg, z, tau[i])
        z = z + (t[i + 1] - t[i]) * (d - z) / (1 - t[i] + 1e-5)
    expected = denoiser_np(params, cfg, z, tau[num_steps - 1]).argmax(-1)

    assert ids.shape == (4, 6) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, expected)


def test_sampler_is_deterministic_given_z0(random_tiny_params):
    cfg = tiny_model_config()
    params = random_tiny_params(cfg)
    z0 = jax.random.normal(jax.random.key(0), (3, 5, cfg.vocab_size))
    a = np.asarray(flm_sample(params, cfg, z0, 4))
    b = np.asarray(flm_sample(params, cfg, z0, 4))
    c = np.asarray(flm_sample(params, cfg, jax.random.normal(jax.random.key(1), z0.shape), 4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert a.min() >= 0 and a.max() < cfg.vocab_size


def test_sampler_rejects_bad_input(random_tiny_params):
    cfg = tiny_model_config()
    params = random_tiny_params(cfg)
    with pytest.raises(ValueError, match="num_steps"):
        flm_sample(params, cfg, jnp.zeros((1, 4, cfg.vocab_size)), 0)
    with pytest.raises(ValueError, match=r"z0 must be \(B, L, 23\)"):
        flm_sample(params, cfg, jnp.zeros((1, 4, cfg.vocab_size + 1)), 2)


# ------------------------------------------------------------------ FMLM γ-sampler

from fmlm_jax.sampling import fmlm_time_grid  # noqa: E402


def test_fmlm_grid_matches_spec_fixtures():
    g = fmlm_time_grid(30522, 2, 0.8)
    np.testing.assert_allclose([g["s"][0], g["t_next"][0], g["t_tilde"][0], g["tau_tilde"][0]],
                               [0.0, 0.8045, 0.8827, 0.99939], atol=1e-4)
    g = fmlm_time_grid(30522, 4, 0.8)
    np.testing.assert_allclose(g["t_next"], [0.7735, 0.8045, 0.8281, 1.0], atol=1e-4)
    np.testing.assert_allclose(g["tau_tilde"], [0.98386, 0.99939, 0.99999, 1.0], atol=1e-5)
    g = fmlm_time_grid(30522, 4, 0.0)  # no noise: t̃ = t⁺ and τ̃ is the grid point
    np.testing.assert_allclose(g["t_tilde"], g["t_next"])
    np.testing.assert_allclose(g["tau_tilde"], [0.25, 0.5, 0.75, 1.0])


def log_delta_np(params, cfg, z, tau_s, tau_t):
    logits = DiT(cfg).apply({"params": params}, jnp.asarray(z, jnp.float32),
                            jnp.full((z.shape[0],), tau_s, jnp.float32),
                            jnp.full((z.shape[0],), tau_t, jnp.float32))
    return scipy.special.log_softmax(30 * np.tanh(np.asarray(logits, np.float64) / 30), -1)


@pytest.mark.parametrize("num_steps,gamma", [(1, 0.0), (3, 0.0), (3, 0.8)])
def test_fmlm_sampler_matches_hand_loop(num_steps, gamma, random_tiny_params):
    cfg = tiny_model_config(two_time=True)
    params = random_tiny_params(cfg)
    z0 = np.random.default_rng(1).standard_normal((4, 6, cfg.vocab_size)).astype(np.float32)
    rng = jax.random.key(7)
    ids = np.asarray(fmlm_sample(params, cfg, jnp.asarray(z0), num_steps, gamma, rng))

    g = fmlm_time_grid(cfg.vocab_size, num_steps, gamma)
    z = z0.astype(np.float64)
    for i in range(num_steps - 1):
        delta = np.exp(log_delta_np(params, cfg, z, g["tau_s"][i], g["tau_tilde"][i]))
        s, tt = g["s"][i], g["t_tilde"][i]
        z = ((1 - tt) / (1 - s)) * z + ((tt - s) / (1 - s)) * delta
        if gamma > 0:  # the sampler's noise for step i: normal(fold_in(rng, i))
            xi = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), z.shape))
            z = z + (g["sigma_tilde"][i] - g["sigma"][i]) * delta + gamma * g["sigma"][i] * xi
    last = num_steps - 1
    expected = log_delta_np(params, cfg, z, g["tau_s"][last], g["tau_tilde"][last]).argmax(-1)
    np.testing.assert_array_equal(ids, expected)
    if num_steps == 1:  # one step is argmax δ_{0,1}(z0)
        np.testing.assert_array_equal(ids, log_delta_np(params, cfg, z0, 0.0, 1.0).argmax(-1))


def test_fmlm_sampler_noise_key_matters_only_with_gamma(random_tiny_params):
    cfg = tiny_model_config(two_time=True)
    params = random_tiny_params(cfg)
    z0 = jax.random.normal(jax.random.key(0), (8, 6, cfg.vocab_size))
    a = fmlm_sample(params, cfg, z0, 4, 0.9, jax.random.key(1))
    b = fmlm_sample(params, cfg, z0, 4, 0.9, jax.random.key(2))
    assert (np.asarray(a) != np.asarray(b)).any()
    c = fmlm_sample(params, cfg, z0, 4, 0.0, jax.random.key(1))
    d = fmlm_sample(params, cfg, z0, 4, 0.0, jax.random.key(2))
    np.testing.assert_array_equal(c, d)


def test_fmlm_sampler_errors(random_tiny_params):
    cfg = tiny_model_config(two_time=True)
    params = random_tiny_params(cfg)
    z0 = jnp.zeros((1, 4, cfg.vocab_size))
    with pytest.raises(ValueError, match="gamma"):
        fmlm_sample(params, cfg, z0, 2, 1.5, jax.random.key(0))
    with pytest.raises(ValueError, match="rng"):
        fmlm_sample(params, cfg, z0, 2, 0.5)
    one_time = tiny_model_config()
    with pytest.raises(ValueError, match="two-time"):
        fmlm_sample(random_tiny_params(one_time), one_time, z0, 1)


def _matching_dense_start(params, eps_d):
    """z₀ = ε̃·C⁻¹·Eᵀ, the minimum-norm z₀ with z₀·E = ε̃·Cᵀ: the dense sampler started
    there sees exactly the projected sampler's inputs."""
    e = params["vocab_embed"]["embedding"]
    c = interpolant.projected_noise_factor(e)
    rows = jax.scipy.linalg.solve_triangular(c, eps_d[..., None], lower=True, trans="T")[..., 0]
    return jnp.einsum("bld,kd->blk", rows, e)  # rows = ε̃·C⁻¹ (Cᵀ·rowsᵀ = ε̃ᵀ)
@pytest.mark.parametrize("two_time", [False, True])
def test_projected_samplers_equal_dense_given_matching_noise(two_time):
    cfg = tiny_model_config(two_time=two_time, **SMALL)
    params = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    eps_d = jax.random.normal(jax.random.key(2), (6, 5, cfg.hidden_size))
    z0 = _matching_dense_start(params, eps_d)
    np.testing.assert_allclose(z0 @ params["vocab_embed"]["embedding"],
                               eps_d @ interpolant.projected_noise_factor(
                                   params["vocab_embed"]["embedding"]).T, atol=1e-4)
    sample = fmlm_sample if two_time else flm_sample
    dense = np.asarray(sample(params, cfg, z0, 3))
    projected = np.asarray(sample(params, cfg, eps_d, 3, projected=True))
    assert (dense != dense[0, 0]).any()  # not a constant output
    np.testing.assert_array_equal(projected, dense)
    with pytest.raises(ValueError, match=r"z0 must be \(B, L, 16\)"):
        sample(params, cfg, z0, 3, projected=True)
def test_projected_fmlm_sampler_with_noise_agrees_in_distribution():
    # γ > 0 draws fresh noise each step: (B, L, K) in the dense sampler, ε̃·Cᵀ in the
    # projected one, so outputs agree in law only. Compare the token frequencies.
    cfg = tiny_model_config(two_time=True, **SMALL)
    params = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    shape = (2000, 8)  # 16k tokens: frequency noise ~0.01 in total variation
    z0 = jax.random.normal(jax.random.key(2), (*shape, cfg.vocab_size))
    eps_d = jax.random.normal(jax.random.key(3), (*shape, cfg.hidden_size))
    dense = np.asarray(fmlm_sample(params, cfg, z0, 3, 0.8, jax.random.key(4)))
    projected = np.asarray(fmlm_sample(params, cfg, eps_d, 3, 0.8, jax.random.key(5), projected=True))
    pa = np.bincount(dense.ravel(), minlength=cfg.vocab_size) / dense.size
    pb = np.bincount(projected.ravel(), minlength=cfg.vocab_size) / projected.size
    assert 0.5 * np.abs(pa - 1.0 / cfg.vocab_size).sum() > 0.15  # far from uniform: a real check
    assert 0.5 * np.abs(pa - pb).sum() < 0.04, 0.5 * np.abs(pa - pb).sum()


# ----------------------------------------------------------------------------- guidance (SPEC §11)
# An exact toy model: two-token phrases ("new york", "san diego", ...). The exact denoiser is the
# posterior mean over the phrases, its two-time denoiser δ_{s,t} comes from the exact flow map
# (RK4), so guided samples can be judged: a sample is valid if it is one of the phrases.

PHRASES = ("new york", "san diego", "los angeles", "hong kong", "las vegas", "buenos aires",
           "tel aviv", "kuala lumpur")
WORDS = sorted({w for p in PHRASES for w in p.split()})
PHRASE_IDS = np.array([[WORDS.index(w) for w in p.split()] for p in PHRASES])
PK = len(WORDS)
T_END = 0.995  # the exact flow is integrated to here (1 − t divides its velocity)


def _posterior_mean(x, t):
    return posterior_mean(x, t, PHRASE_IDS, PK)


def _exact_delta(x, s, t, steps=60):
    """δ_{s,t}(x) of the exact flow map, t capped at T_END."""
    t = jnp.minimum(t, T_END)
    rows = lambda v: v[:, None, None]  # noqa: E731
    x_t = rk4_flow(_posterior_mean, x, s, t, steps)
    return (x_t - rows((1 - t) / (1 - s)) * x) * rows((1 - s) / (t - s))


def exact_fmlm_denoiser():
    sched = Schedule(PK)

    def probs(z, tau_s, tau_t):
        s, t = sched.tau_to_t(tau_s), sched.tau_to_t(tau_t)
        same = jnp.abs(t - s) < 1e-6
        delta = _exact_delta(z, s, jnp.where(same, s + 1e-3, t))
        return jnp.where(same[:, None, None], _posterior_mean(z, s), delta)

    return sampling.Denoiser(probs, probs, lambda d: d, sampling._dense_noise)


def _phrase_stats(ids, target):
    ids = np.asarray(ids)
    valid = np.mean([tuple(row) in {tuple(p) for p in PHRASE_IDS} for row in ids])
    return float(np.mean(np.all(ids == PHRASE_IDS[target], axis=1))), float(valid)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_keyword_guidance_raises_the_target_phrase_monotonically_and_keeps_samples_valid(num_steps):
    target = PHRASES.index("san diego")
    reward = rewards.keyword([WORDS.index("diego")], PK)
    grid = sampling.fmlm_time_grid(PK, num_steps, 0.0)
    z0 = jax.random.normal(jax.random.key(0), (400, 2, PK))
    den = exact_fmlm_denoiser()
    run = jax.jit(lambda z, guide: sampling.gamma_loop(den, z, grid, 0.0, jax.random.key(1), guide),
                  static_argnums=1)
    freqs, valids = [], []
    for lam in (0.0, 0.1, 0.3, 1.0):
        guide = None if lam == 0.0 else sampling.RewardGuidance(reward, lam)
        freq, valid = _phrase_stats(run(z0, guide), target)
        freqs.append(freq)
        valids.append(valid)
    assert freqs[0] < 0.25 and freqs[-1] > 0.6, freqs  # ~1/8 unguided
    assert all(b >= a - 0.02 for a, b in zip(freqs, freqs[1:], strict=False)), freqs  # monotone in λ
    assert min(valids) > 0.95, valids


def test_the_reward_gradient_through_the_look_ahead_matches_finite_differences():
    # The look-ahead δ_{τ_s,1}(z) of a (random) two-time network, and a keyword reward on it.
    cfg = tiny_model_config(two_time=True, **SMALL)
    params = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    den = sampling.network_denoiser(params, cfg)
    reward = rewards.keyword([3, 7], cfg.vocab_size)
    guide = sampling.RewardGuidance(reward, 1.0)
    tau = jnp.full((3,), 0.3)

    def total(z):
        return float(reward(den.probs(z, tau, jnp.ones(3))).sum())

    z = jax.random.normal(jax.random.key(2), (3, 5, cfg.vocab_size))
    _, g, _ = sampling._reward_gradient(guide, lambda z: den.probs(z, tau, jnp.ones(3)), z)
    assert float(jnp.abs(g).max()) > 1e-3
    for seed in range(3):
        direction = jax.random.normal(jax.random.key(10 + seed), z.shape)
        h = 1e-2
        fd = (total(z + h * direction) - total(z - h * direction)) / (2 * h)
        assert float(jnp.sum(g * direction)) == pytest.approx(fd, rel=1e-2, abs=1e-3)


@pytest.mark.parametrize("mode,two_time", [  # each mode and each sampler once by default
    ("P", False), ("L", True), pytest.param("P", True, marks=pytest.mark.slow),
    pytest.param("L", False, marks=pytest.mark.slow)])
def test_autoguidance_with_the_weak_model_equal_to_the_strong_one_is_the_identity(mode, two_time):
    cfg = tiny_model_config(two_time=two_time, **SMALL)
    params = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    sample = flm_sample if not two_time else (lambda *a, **k: fmlm_sample(*a[:4], 0.0, None, *a[4:], **k))
    for projected in (False, True):
        auto0 = sampling.AutoGuidance(cfg, 0.0, mode)
        z0 = sampling.initial_noise(jax.random.key(2), 8, 5, cfg, projected, auto0)
        base = sample(params, cfg, z0, 3, projected, auto=auto0, weak_params=params)
        for eta in (5.0,):  # (each η is a compile)
            auto = sampling.AutoGuidance(cfg, eta, mode)
            guided = sample(params, cfg, z0, 3, projected, auto=auto, weak_params=params)
            np.testing.assert_array_equal(guided, base)
    # ... and at η = 0, with a different weak model, it is the unguided sampler.
    weak = randomize(init_params(cfg, jax.random.key(5)), jax.random.key(6))
    z0 = sampling.initial_noise(jax.random.key(2), 8, 5, cfg)
    off = sample(params, cfg, z0, 3, False, auto=sampling.AutoGuidance(cfg, 0.0, mode), weak_params=weak)
    np.testing.assert_array_equal(off, sample(params, cfg, z0, 3, False))


def test_autoguidance_modes_on_and_off_the_simplex():
    cfg = tiny_model_config(**SMALL)
    strong = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    weak = randomize(init_params(cfg, jax.random.key(2)), jax.random.key(3))
    z = jax.random.normal(jax.random.key(4), (4, 5, cfg.vocab_size))
    tau = jnp.full((4,), 0.4)
    logp = {}
    for mode in ("P", "L"):
        den = sampling.autoguided_denoiser(strong, cfg, weak, sampling.AutoGuidance(cfg, 3.0, mode))
        logp[mode] = den.probs(z, tau, tau)
    np.testing.assert_allclose(logp["L"].sum(-1), 1.0, atol=1e-5)  # mode L stays on the simplex
    assert float(logp["L"].min()) >= 0.0
    np.testing.assert_allclose(logp["P"].sum(-1), 1.0, atol=1e-5)  # mode P sums to 1 but leaves it
    assert float(logp["P"].min()) < 0.0
    s = jax.nn.softmax(model.denoiser_scores(strong, cfg)(z, tau), -1)
    w = jax.nn.softmax(model.denoiser_scores(weak, cfg)(z, tau), -1)
    np.testing.assert_allclose(logp["P"], s + 3.0 * (s - w), atol=1e-5)


def test_projected_and_dense_autoguided_samplers_agree_in_distribution():
    # A weak model of another width: the projected state carries both views of one z.
    cfg = tiny_model_config(two_time=True, **SMALL)
    weak_cfg = tiny_model_config(two_time=True, **{**SMALL, "hidden_size": 8})
    strong = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    weak = randomize(init_params(weak_cfg, jax.random.key(2)), jax.random.key(3))
    auto = sampling.AutoGuidance(weak_cfg, 2.0, "L")
    counts = {}
    for projected in (False, True):
        z0 = sampling.initial_noise(jax.random.key(4), 1500, 6, cfg, projected, auto)
        ids = fmlm_sample(strong, cfg, z0, 3, 0.8, jax.random.key(5), projected, auto=auto, weak_params=weak)
        counts[projected] = np.bincount(np.asarray(ids).ravel(), minlength=cfg.vocab_size) / ids.size
    assert 0.5 * np.abs(counts[True] - counts[False]).sum() < 0.06


def test_guidance_refusals():
    cfg = tiny_model_config(**SMALL)
    params = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    z0 = sampling.initial_noise(jax.random.key(2), 2, 4, cfg)
    with pytest.raises(ValueError, match="needs weak_params"):
        flm_sample(params, cfg, z0, 2, auto=sampling.AutoGuidance(cfg, 1.0))
    with pytest.raises(ValueError, match="mode must be one of"):
        flm_sample(params, cfg, z0, 2, auto=sampling.AutoGuidance(cfg, 1.0, "Q"), weak_params=params)
    other = tiny_model_config(**{**SMALL, "vocab_size": 41})
    with pytest.raises(ValueError, match="share the strong model's vocabulary"):
        flm_sample(params, cfg, z0, 2, auto=sampling.AutoGuidance(other, 1.0), weak_params=params)
    guide = sampling.RewardGuidance(rewards.keyword([1], cfg.vocab_size), 1.0)
    with pytest.raises(ValueError, match="dense states"):
        flm_sample(params, cfg, sampling.initial_noise(jax.random.key(2), 2, 4, cfg, True), 2, True,
                   reward=guide)
