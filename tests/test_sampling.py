"""FLM Euler sampler (SPEC §6) against a step-by-step numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from conftest import randomize, tiny_model_config

from fmlm_jax import interpolant
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
