"""FLM objective (SPEC §4) against a hand computation in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from conftest import randomize, run_config, tiny_model_config

from fmlm_jax import interpolant
from fmlm_jax.model import DiT, init_params
from fmlm_jax.objectives.flm import antithetic_uniform, draw_plan, flm_loss, flm_loss_at
from fmlm_jax.schedule import Schedule

SMALL = dict(vocab_size=40, hidden_size=16, n_heads=2)  # K ≥ d, as in every real model


def full_config(model, tau_min=0.0, tau_max=1.0, projected=False):
    return run_config("flm", model=model,
                      flm=dict(tau_min=tau_min, tau_max=tau_max, projected_noise=projected))


@pytest.mark.parametrize("n", [1, 7, 64])
def test_antithetic_uniform_is_one_point_per_stratum(n):
    u = np.sort(np.asarray(antithetic_uniform(jax.random.key(3), n)))
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.bincount(np.floor(u * n).astype(int), minlength=n)
    np.testing.assert_array_equal(counts, np.ones(n))  # exactly one draw in each [i/n, (i+1)/n)


def test_antithetic_uniform_draws_one_offset_per_stratum():
    # The reference draws one uniform per stratum (not one shared offset): the positions of
    # the draws inside their strata are i.i.d. U(0, 1).
    n, draws = 16, 200
    offsets = []
    for seed in range(draws):
        u = np.sort(np.asarray(antithetic_uniform(jax.random.key(seed), n), np.float64))
        offsets.append(u * n - np.arange(n))
    offsets = np.asarray(offsets)
    assert scipy.stats.kstest(offsets.ravel(), "uniform").pvalue > 1e-3
    corr = np.corrcoef(offsets[:, 0], offsets[:, 1])[0, 1]  # a shared offset would give 1
    assert abs(corr) < 4 / np.sqrt(draws), corr


def test_antithetic_uniform_is_permuted_and_mean_half():
    u = np.asarray(antithetic_uniform(jax.random.key(0), 256))
    assert not np.all(np.diff(u) > 0)  # not left sorted
    assert abs(u.mean() - 0.5) < 1.0 / 256 + 1e-6  # stratification: mean within one stratum of 1/2


@pytest.mark.parametrize("llw", [False, True])
def test_loss_matches_hand_computation(llw, random_tiny_params):
    cfg = tiny_model_config(learnable_loss_weighting=llw)
    params = random_tiny_params(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (3, 7)).astype(np.int32)
    mask = (rng.random((3, 7)) < 0.7).astype(np.float32)
    tau = np.array([0.05, 0.5, 0.93], np.float32)
    eps = rng.standard_normal((3, 7, cfg.vocab_size)).astype(np.float32)

    loss, metrics = flm_loss_at(params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(tau),
                                jnp.asarray(eps), jax.random.key(0), cfg, train=False)

    t = Schedule(cfg.vocab_size).tau_to_t(tau.astype(np.float64))[:, None, None]
    x_t = (1 - t) * eps + t * np.eye(cfg.vocab_size)[tokens]
    logits = np.asarray(DiT(cfg).apply({"params": params}, jnp.asarray(x_t, jnp.float32),
                                       jnp.asarray(tau)), np.float64)
    log_p = scipy.special.log_softmax(30 * np.tanh(logits / 30), axis=-1)
    nll = -np.take_along_axis(log_p, tokens[..., None], -1)[..., 0]
    per_token = nll
    if llw:
        w = np.asarray(DiT(cfg).apply({"params": params}, jnp.asarray(tau), method=DiT.loss_weight))
        assert np.abs(w).max() > 1e-3  # random weights: the weighting is really exercised
        per_token = np.exp(-w)[:, None] * nll + w[:, None]
    expected = (per_token * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["nll"]), (nll * mask).sum() / mask.sum(), rtol=2e-5)


def test_zero_init_model_has_loss_log_k():
    cfg = tiny_model_config()
    params = init_params(cfg, jax.random.key(0))  # adaLN and output layer start at zero
    tokens = jax.random.randint(jax.random.key(1), (4, 5), 0, cfg.vocab_size)
    loss, _ = flm_loss(params, {"tokens": tokens}, jax.random.key(2), full_config(cfg))
    np.testing.assert_allclose(float(loss), np.log(cfg.vocab_size), rtol=1e-6)


def test_times_are_drawn_in_the_configured_range():
    cfg = tiny_model_config()
    plan = draw_plan(jax.random.key(0), 16, full_config(cfg, 0.2, 0.6))
    tau = np.sort(np.asarray(plan["tau"]))
    assert tau.min() >= 0.2 and tau.max() < 0.6
    strata = np.floor((tau - 0.2) / (0.4 / 16)).astype(int)
    np.testing.assert_array_equal(strata, np.arange(16))  # antithetic: one τ per stratum
    assert plan["key"].shape == (16,)


def test_loss_jits_differentiates_and_depends_on_rng(random_tiny_params):
    cfg = tiny_model_config(dropout=0.1)
    params = random_tiny_params(cfg)
    config = full_config(cfg)
    tokens = jax.random.randint(jax.random.key(1), (4, 6), 0, cfg.vocab_size)
    fn = jax.jit(jax.value_and_grad(lambda p, r: flm_loss(p, {"tokens": tokens}, r, config)[0]))
    l1, g1 = fn(params, jax.random.key(0))
    l2, _ = fn(params, jax.random.key(1))
    l1_again, _ = fn(params, jax.random.key(0))
    assert float(l1) == float(l1_again)
    assert float(l1) != float(l2)
    leaves = jax.tree_util.tree_leaves(g1)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


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
    config = full_config(cfg, projected=True)
    params = randomize(init_params(cfg, jax.random.key(0)), jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (4, 5), 0, cfg.vocab_size)
    (loss, _), grads = jax.jit(jax.value_and_grad(
        lambda p: flm_loss(p, {"tokens": tokens}, jax.random.key(3), config), has_aux=True))(params)
    assert np.isfinite(float(loss))
    # The input matrix still learns: through E[x₁] and through the noise factor C.
    assert float(jnp.abs(grads["vocab_embed"]["embedding"]).sum()) > 0
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
