"""Train step (SPEC §4 recipe pieces) and the first main job."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_model_config

from fmlm_jax import sampling, train
from fmlm_jax.data import synthetic


def small_config(**train_overrides):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = tiny_model_config()
    config.flm = dict(tau_min=0.0, tau_max=1.0)
    config.train = dict(num_steps=10, lr=1e-3, warmup_steps=4, b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, log_every=5)
    config.train.update(train_overrides)
    return config


def test_ema_decay_follows_the_warm_up_formula():
    n = np.array([1, 2, 10, 100, 10**6])
    expected = np.minimum(0.999, (1 + n) / (10 + n))
    np.testing.assert_allclose(np.asarray(train.ema_decay(jnp.asarray(n), 0.999)), expected, rtol=1e-6)


def test_learning_rate_warms_up_linearly_then_stays_constant():
    config = small_config(lr=1e-2, warmup_steps=4)
    params = {"w": jnp.zeros(())}
    opt = train.make_optimizer(config.train)
    state = opt.init(params)
    lrs = []
    for _ in range(7):  # with a constant gradient, Adam's first steps move by ≈ lr
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(updates["w"]))
    np.testing.assert_allclose(lrs, [0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2], rtol=1e-3, atol=1e-7)


def test_train_step_updates_params_and_ema_by_the_formula():
    config = small_config()
    state = train.create_train_state(config, jax.random.key(0))
    old_ema = jax.tree_util.tree_map(np.asarray, state.ema_params)
    batch = {"tokens": jnp.zeros((4, 6), jnp.int32)}
    new_state, metrics = train.jit_train_step(config)(state, batch, jax.random.key(1))
    assert int(new_state.step) == 1
    decay = min(0.9999, 2 / 11)
    for e_new, e_old, p in zip(jax.tree_util.tree_leaves(new_state.ema_params),
                               jax.tree_util.tree_leaves(old_ema),
                               jax.tree_util.tree_leaves(new_state.params), strict=False):
        np.testing.assert_allclose(np.asarray(e_new), decay * e_old + (1 - decay) * np.asarray(p),
                                   rtol=1e-5, atol=1e-7)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def train_on_phrases(config) -> dict:
    """Trains a tiny FLM on the synthetic phrases in memory and samples with the EMA weights.
    Returns {"losses", "valid_bigrams" (per step count), "params"}."""
    tokenizer = synthetic.WordTokenizer()
    if len(tokenizer) != config.model.vocab_size:
        raise ValueError(f"model.vocab_size is {config.model.vocab_size} but the synthetic "
                         f"vocabulary has {len(tokenizer)} words")
    init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 3)
    state = train.create_train_state(config, init_rng)
    step_fn = train.jit_train_step(config)
    data = synthetic.batches(config.data.batch_size, config.data.seq_len, config.seed, tokenizer)
    losses = []
    for step in range(1, config.train.num_steps + 1):
        state, metrics = step_fn(state, next(data), train_rng)
        if step % config.train.log_every == 0 or step == config.train.num_steps:
            losses.append((step, float(metrics["loss"])))
    quality = {}
    z0 = jax.random.normal(sample_rng, (config.sample.num_samples, config.data.seq_len,
                                        config.model.vocab_size))
    for num_steps in config.sample.steps:
        ids = np.asarray(sampling.flm_sample(state.ema_params, config.model, z0, num_steps))
        quality[num_steps] = synthetic.valid_bigram_fraction(ids, tokenizer)
    return {"losses": losses, "valid_bigrams": quality, "params": state.ema_params}


@pytest.fixture(scope="module")
def demo_run():
    config = ml_collections.ConfigDict(
        dict(seed=0, data=dict(seq_len=12, batch_size=32),
             model=tiny_model_config(vocab_size=len(synthetic.WordTokenizer())),
             flm=dict(tau_min=0.0, tau_max=1.0),
             train=dict(num_steps=300, lr=3e-3, warmup_steps=20, b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, log_every=50),
             sample=dict(num_samples=64, steps=(16,)))
    )
    return config, train_on_phrases(config)


def test_demo_learns_the_synthetic_phrases(demo_run):
    config, result = demo_run
    losses = [loss for _, loss in result["losses"]]
    # The zero-initialised model starts at exactly log K (uniform prediction).
    assert losses[-1] < 0.5 * np.log(config.model.vocab_size)
    assert losses[-1] < losses[0]
    # Uniformly random tokens form a corpus bigram ~3% of the time.
    vocab = len(synthetic.WordTokenizer())
    chance = len(synthetic.corpus_bigrams(synthetic.WordTokenizer())) / vocab**2
    assert chance < 0.05
    assert result["valid_bigrams"][16] > 5 * chance


def test_word_tokenizer_round_trips_and_rejects_unknown_words():
    tok = synthetic.WordTokenizer()
    text = synthetic.PHRASES[0]
    assert tok.decode(tok.encode(text)) == text
    try:
        tok.encode("zebra")
    except ValueError as err:
        assert "zebra" in str(err)
    else:
        raise AssertionError("unknown word accepted")


def test_projected_sampler_agrees_in_distribution_with_dense(demo_run):
    config, result = demo_run
    tokenizer = synthetic.WordTokenizer()
    shape = (512, config.data.seq_len)
    z0 = jax.random.normal(jax.random.key(5), (*shape, config.model.vocab_size))
    eps0 = jax.random.normal(jax.random.key(6), (*shape, config.model.hidden_size))
    dense = sampling.flm_sample(result["params"], config.model, z0, 16)
    projected = sampling.flm_sample_projected(result["params"], config.model, eps0, 16)
    a = synthetic.valid_bigram_fraction(np.asarray(dense), tokenizer)
    b = synthetic.valid_bigram_fraction(np.asarray(projected), tokenizer)
    assert a > 0.15 and abs(a - b) < 0.06, (a, b)
    # Unigram frequencies agree too (total variation distance).
    vocab = config.model.vocab_size
    pa = np.bincount(np.asarray(dense).ravel(), minlength=vocab) / dense.size
    pb = np.bincount(np.asarray(projected).ravel(), minlength=vocab) / projected.size
    assert 0.5 * np.abs(pa - pb).sum() < 0.08
