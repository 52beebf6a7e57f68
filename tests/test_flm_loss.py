"""FLM objective (SPEC §4) against a hand computation in numpy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special
from conftest import tiny_model_config

from fmlm_jax.model import DiT, init_params
from fmlm_jax.objectives.flm import antithetic_uniform, draw_plan, flm_loss, flm_loss_at
from fmlm_jax.schedule import Schedule


def full_config(model, tau_min=0.0, tau_max=1.0):
    return ml_collections.ConfigDict(dict(model=model, flm=dict(tau_min=tau_min, tau_max=tau_max)))


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
