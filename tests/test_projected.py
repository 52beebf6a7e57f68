"""The projected-noise input path (SPEC §10): exact in distribution, same loss statistics."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import randomize, tiny_model_config

from fmlm_jax import interpolant
from fmlm_jax.model import DiT, init_params
from fmlm_jax.objectives.flm import flm_loss, flm_loss_at


def test_projected_noise_has_the_dense_covariance():
    e = jax.random.normal(jax.random.key(0), (40, 6)) / 3.0  # E (K, d)
    factor = interpolant.projected_noise_factor(e)
    np.testing.assert_allclose(factor @ factor.T, e.T @ e, rtol=1e-5, atol=1e-6)
    n = 200_000
    dense = jax.random.normal(jax.random.key(1), (n, 40)) @ e  # ε·E
    projected = jax.random.normal(jax.random.key(2), (n, 6)) @ factor.T  # ε̃·Cᵀ
    target = np.asarray(e.T @ e)
    tol = 6 * np.sqrt((np.diag(target)[:, None] * np.diag(target)[None, :] + target**2) / n)
    for sample in (dense, projected):
        cov = np.cov(np.asarray(sample), rowvar=False)
        assert np.all(np.abs(cov - target) < tol)
        assert np.all(np.abs(np.asarray(sample).mean(0)) < 6 * np.sqrt(np.diag(target) / n))


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


def test_dense_and_projected_losses_have_the_same_statistics():
    cfg = tiny_model_config(vocab_size=31, hidden_size=16, n_heads=2, n_blocks=1)
    params = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (4, 6), 0, cfg.vocab_size)
    tau = jnp.array([0.05, 0.3, 0.6, 0.9])

    def loss(projected, key):
        width = cfg.hidden_size if projected else cfg.vocab_size
        eps = jax.random.normal(key, (*tokens.shape, width))
        return flm_loss_at(params, tokens, None, tau, eps, key, cfg, False, projected)[0]

    keys = jax.random.split(jax.random.key(3), 400)
    dense = np.asarray(jax.jit(jax.vmap(lambda k: loss(False, k)))(keys))
    projected = np.asarray(jax.jit(jax.vmap(lambda k: loss(True, k)))(keys))
    se = np.sqrt(dense.var() / len(dense) + projected.var() / len(projected))
    assert abs(dense.mean() - projected.mean()) < 4 * se
    assert 0.75 < projected.var() / dense.var() < 1.33


def test_projected_flm_loss_trains():
    cfg = tiny_model_config(**SMALL)
    config = ml_collections.ConfigDict(
        dict(model=cfg, flm=dict(tau_min=0.0, tau_max=1.0, projected_noise=True)))
    params = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (4, 5), 0, cfg.vocab_size)
    (loss, _), grads = jax.jit(jax.value_and_grad(
        lambda p: flm_loss(p, {"tokens": tokens}, jax.random.key(3), config), has_aux=True))(params)
    assert np.isfinite(float(loss))
    # The input matrix still learns: through E[x₁] and through the noise factor C.
    assert float(jnp.abs(grads["vocab_embed"]["embedding"]).sum()) > 0
