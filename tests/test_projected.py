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


def _grad_samples(params, cfg, tokens, tau, projected, keys, detach_factor=False):
    """∂loss/∂E for each noise key (dense ε or projected ε̃), dropout off."""
    def loss(p, key):
        if detach_factor:  # the biased variant: no gradient through C = chol(EᵀE)
            e = p["vocab_embed"]["embedding"]
            t = jnp.asarray(__import__("fmlm_jax.schedule").schedule.Schedule(cfg.vocab_size)
                            .tau_to_t(tau))[:, None, None]
            eps = jax.random.normal(key, (*tokens.shape, cfg.hidden_size))
            c = jax.lax.stop_gradient(interpolant.projected_noise_factor(e))
            h = (1 - t) * eps @ c.T + t * e[tokens]
            logits = DiT(cfg).apply({"params": p}, h, tau, embedded=True)
            lp = jax.nn.log_softmax(30 * jnp.tanh(logits / 30))
            return -jnp.take_along_axis(lp, tokens[..., None], -1).mean()
        width = cfg.hidden_size if projected else cfg.vocab_size
        eps = jax.random.normal(key, (*tokens.shape, width))
        return flm_loss_at(p, tokens, None, tau, eps, key, cfg, False, projected)[0]

    grads = jax.jit(jax.vmap(lambda k: jax.grad(loss)(params, k)["vocab_embed"]["embedding"]))(keys)
    return np.asarray(grads, np.float64).reshape(len(keys), -1)


def test_projected_gradient_into_the_input_matrix_matches_dense_in_expectation():
    # The reference trains E through the dense input x_t·E; the projected path must give
    # the same gradient in expectation, which needs a gradient through the factor C.
    cfg = tiny_model_config(vocab_size=24, hidden_size=8, n_heads=2, n_blocks=1, cond_dim=8)
    params = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    params["vocab_embed"]["embedding"] = params["vocab_embed"]["embedding"] * 3.0  # noise matters
    tokens = jax.random.randint(jax.random.key(2), (4, 4), 0, cfg.vocab_size)
    tau = jnp.array([0.0, 0.05, 0.2, 0.4])  # noisy times: the noise path carries gradient
    keys = jax.random.split(jax.random.key(3), 1000)
    dense = _grad_samples(params, cfg, tokens, tau, False, keys)
    projected = _grad_samples(params, cfg, tokens, tau, True, keys)
    detached = _grad_samples(params, cfg, tokens, tau, True, keys, detach_factor=True)

    def z_scores(a, b):
        se = np.sqrt(a.var(0) / len(a) + b.var(0) / len(b)) + 1e-12
        return (a.mean(0) - b.mean(0)) / se

    z = z_scores(dense, projected)
    # 192 entries: under equal means each |z| < 4.5 with high probability and mean z² ≈ 1
    # (measured: max |z| 2.5, mean z² 0.9; without ∂C/∂E mean z² 27).
    assert np.abs(z).max() < 4.5 and (z**2).mean() < 1.5, (np.abs(z).max(), (z**2).mean())
    z_bad = z_scores(dense, detached)  # the test has power: dropping ∂C/∂E is detected
    assert (z_bad**2).mean() > 3.0, (z_bad**2).mean()


# ------------------------------------------------------------------ samplers

from fmlm_jax.sampling import flm_sample, fmlm_sample  # noqa: E402


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
