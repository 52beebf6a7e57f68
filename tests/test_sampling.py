"""FLM Euler sampler (SPEC §6) against a step-by-step numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from conftest import tiny_model_config

from fmlm_jax.model import DiT
from fmlm_jax.sampling import flm_sample
from fmlm_jax.schedule import Schedule


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

from fmlm_jax.sampling import fmlm_sample, fmlm_time_grid  # noqa: E402


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
