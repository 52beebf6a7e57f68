"""Checkpoints: exact resume (state + grain iterator), retention, atomicity, config checks,
weights by path (training workdir or converted directory)."""

import os
import time

import conftest
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from fmlm_jax import checkpoints, train
from fmlm_jax import model as model_lib
from fmlm_jax.data import pipeline, prepare

SEQ_LEN, BATCH, VOCAB = 8, 4, 23


def run_config(**model_overrides):
    return conftest.run_config(
        "flm", model=tiny_model_config(**{"dropout": 0.1, **model_overrides}),  # dropout: rng matters
        seed=7, data=dict(seq_len=SEQ_LEN, batch_size=BATCH),
        train=dict(num_steps=12, lr=3e-3, warmup_steps=3, weight_decay=0.01, ema_decay=0.999, log_every=5))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """40 random blocks: 10 batches an epoch, so 12 steps cross an epoch (a new shuffle)."""
    out = tmp_path_factory.mktemp("data")
    blocks = np.random.default_rng(0).integers(0, VOCAB, size=(40, SEQ_LEN))
    prepare.write_blocks(iter(blocks), str(out / "train"), SEQ_LEN, VOCAB, {"dataset": "random"},
                         records_per_file=16)
    return str(out)


def new_iterator(data_dir, config):
    return pipeline.make_iterator(data_dir, "train", SEQ_LEN, BATCH, seed=config.seed,
                                  vocab_size=config.model.vocab_size, num_threads=1, prefetch=2)


def new_process(data_dir, config, abstract=False):
    """What a fresh process builds: step function, iterator at position 0, and the initial
    state, or (abstract) its shapes placed on the default device: a template that allocates
    nothing."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if abstract:
        shapes = jax.eval_shape(lambda: train.create_train_state(config, jax.random.key(0)))
        state = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    else:  # placed (committed) like restored arrays, so both processes compile one program
        state = jax.device_put(train.create_train_state(config, jax.random.key(config.seed)), device)
    return train.jit_train_step(config), new_iterator(data_dir, config), state


@pytest.fixture
def compilation_cache(tmp_path):
    """A persistent XLA cache for one test, as a restarted job on one machine would have
    one: the rebuilt step function is retraced and relowered, its compilation read back."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    settings = {"jax_compilation_cache_dir": str(tmp_path / "xla_cache"),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
    old = {name: getattr(jax.config, name) for name in settings}
    cc.reset_cache()
    for name, value in settings.items():
        jax.config.update(name, value)
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    cc.reset_cache()


def run_steps(step_fn, state, it, rng, n):
    losses = []
    for _ in range(n):
        batch = jax.tree_util.tree_map(jnp.asarray, next(it))
        state, metrics = step_fn(state, batch, rng)
        losses.append(np.asarray(metrics["loss"]))
    return state, losses


def host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(host(a))
    lb, tb = jax.tree_util.tree_flatten(host(b))
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bitwise


# ------------------------------------------------------------------ exact resume
@pytest.mark.slow  # the loop's exact resume runs by default: tests/test_train.py
def test_interrupted_run_resumes_exactly(tmp_path, data_dir, compilation_cache):
    """12 steps uninterrupted (saving after step 5 on the way: async, and the next step
    donates the saved buffers) versus a new process that restores step 5 and runs 7 more:
    the same losses, params, EMA and optimizer state, bit for bit."""
    config = run_config()
    rng = jax.random.key(config.seed)
    workdir = str(tmp_path / "run")

    step_fn, it, state = new_process(data_dir, config)
    mngr = checkpoints.open_manager(workdir)
    assert checkpoints.restore_latest(mngr, state, it, config) is None  # fresh start
    state, first = run_steps(step_fn, state, it, rng, 5)
    assert checkpoints.save(mngr, 5, state, it, config=config)  # returns before the write ends
    state, rest = run_steps(step_fn, state, it, rng, 7)
    mngr.close()
    full_losses, full_state = first + rest, host(state)
    del step_fn, it, state, mngr

    # A new process: the step function rebuilt (retraced, recompiled), the iterator at
    # position 0, an abstract template (shapes, dtypes, shardings): everything comes back.
    step_fn, it, template = new_process(data_dir, config, abstract=True)
    mngr = checkpoints.open_manager(workdir)
    state, step = checkpoints.restore_latest(mngr, template, it, config)
    mngr.close()
    assert step == 5 and int(state.step) == 5
    leaf, template_leaf = (jax.tree_util.tree_leaves(s.params)[0] for s in (state, template))
    assert isinstance(leaf, jax.Array) and leaf.sharding == template_leaf.sharding
    state, resumed = run_steps(step_fn, state, it, rng, 7)

    for a, b in zip(full_losses[5:], resumed, strict=True):
        assert a.tobytes() == b.tobytes(), (full_losses, resumed)
    assert_trees_equal(full_state.params, state.params)
    assert_trees_equal(full_state.ema_params, state.ema_params)
    assert_trees_equal(full_state.opt_state, state.opt_state)
    assert int(state.step) == 12


# ------------------------------------------------------------------ small states
def small_state(value=0.0, step=0):
    params = {"w": jnp.full((3,), value, jnp.float32)}
    return train.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                            ema_params={"w": params["w"] + 1}, opt_state=(jnp.zeros((3,)),))


def test_retention_keeps_last_n_and_every_kth(tmp_path):
    config = run_config()
    mngr = checkpoints.open_manager(tmp_path / "run", max_to_keep=2, keep_period=4)
    for step in range(1, 11):
        checkpoints.save(mngr, step, small_state(step, step), config=config)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [4, 8, 9, 10]
    mngr.close()
    assert sorted(int(d) for d in os.listdir(tmp_path / "run") if d.isdigit()) == [4, 8, 9, 10]


def test_latest_step_is_restored_and_interrupted_save_ignored(tmp_path):
    config = run_config()
    workdir = tmp_path / "run"
    with checkpoints.open_manager(workdir) as mngr:
        checkpoints.save(mngr, 3, small_state(3.0, 3), config=config)
        checkpoints.save(mngr, 7, small_state(7.0, 7), config=config)
    # A save killed mid-write: Orbax's temporary directory, never renamed to `9`.
    partial = workdir / "9.orbax-checkpoint-tmp-1234567890"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_text("half a checkpoint")
    with checkpoints.open_manager(workdir, read_only=True) as mngr:
        assert mngr.all_steps() == [3, 7]
        state, step = checkpoints.restore_latest(mngr, small_state(), config=config)
    assert step == 7 and int(state.step) == 7
    assert isinstance(state.params["w"], jax.Array)
    np.testing.assert_array_equal(np.asarray(state.params["w"]), [7.0] * 3)
    np.testing.assert_array_equal(np.asarray(state.ema_params["w"]), [8.0] * 3)
    with checkpoints.open_manager(workdir, read_only=True) as mngr:  # a numpy template
        state, _ = checkpoints.restore_latest(mngr, host(small_state()))
    assert isinstance(state.params["w"], np.ndarray) and state.params["w"][0] == 7.0
    # Opened for writing, the manager removes the leftover (in the background).
    checkpoints.open_manager(workdir).close()
    deadline = time.monotonic() + 10
    while partial.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not partial.exists()


def test_missing_workdir_is_a_fresh_start_but_another_runs_workdir_is_refused(tmp_path):
    config = run_config()
    with checkpoints.open_manager(tmp_path / "new") as mngr:
        assert checkpoints.restore_latest(mngr, small_state(), config=config) is None
    with checkpoints.open_manager(tmp_path / "other") as mngr:
        checkpoints.save(mngr, 1, small_state(), config=run_config(hidden_size=64, n_blocks=3))
    with checkpoints.open_manager(tmp_path / "other") as mngr:
        with pytest.raises(ValueError) as err:
            checkpoints.restore_latest(mngr, small_state(), config=config)
    msg = str(err.value)
    assert "hidden_size: saved 64, config 32" in msg and "n_blocks: saved 3, config 2" in msg
    assert "vocab_size" not in msg and "fresh --workdir" in msg
    # Dropout and compute dtype are not architecture: such a run resumes.
    with checkpoints.open_manager(tmp_path / "new") as mngr:
        checkpoints.save(mngr, 2, small_state(2.0, 2), config=config)
    resume = run_config(dropout=0.0, dtype="bfloat16")
    with checkpoints.open_manager(tmp_path / "new") as mngr:
        assert checkpoints.restore_latest(mngr, small_state(), config=resume)[1] == 2
        with pytest.raises(ValueError, match="holds no data-iterator state"):
            checkpoints.restore_latest(mngr, small_state(), iter(grain.MapDataset.range(3)))


def test_metadata_records_fingerprint_config_and_seed(tmp_path):
    config = run_config()
    with checkpoints.open_manager(tmp_path / "run") as mngr:
        checkpoints.save(mngr, 2, small_state(), config=config, metadata={"teacher": "/t"})
        mngr.wait_until_finished()
        meta = checkpoints.read_metadata(mngr)
    assert meta["format"] == checkpoints.RUN_FORMAT and meta["step"] == 2 and meta["seed"] == 7
    assert meta["model_fingerprint"] == checkpoints.model_fingerprint(config.model)
    assert meta["config"]["train"]["lr"] == 3e-3 and meta["config"]["model"]["hidden_size"] == 32
    assert meta["model_config"]["dropout"] == 0.1 and meta["teacher"] == "/t"


def test_model_fingerprint():
    fp = checkpoints.model_fingerprint
    base = tiny_model_config()
    assert fp(base) == fp(tiny_model_config())
    assert len(fp(base)) == 16 and fp(base) == fp(base.to_dict())
    # Omitted optional fields hash as their defaults; dropout / compute dtype don't count.
    without = {k: v for k, v in base.to_dict().items() if k != "attn_softcap"}
    assert fp(without) == fp(base)
    assert fp(tiny_model_config(dropout=0.3, dtype="bfloat16")) == fp(base)
    for change in (dict(hidden_size=64), dict(n_heads=8), dict(vocab_size=24), dict(two_time=True),
                   dict(learnable_loss_weighting=True), dict(output_cap=20.0),
                   dict(param_dtype="bfloat16")):
        assert fp(tiny_model_config(**change)) != fp(base), change


# ------------------------------------------------------------------ weights by path
def random_params(model_config, seed):
    """Host arrays of the model's parameter shapes (no eager jax init: fast)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                                  model_lib.param_shapes(model_config))


def test_load_weights_from_a_workdir_and_a_converted_directory(tmp_path):
    config = run_config()
    model = config.model
    raw, ema = random_params(model, 0), random_params(model, 1)
    state = train.TrainState(step=np.asarray(4, np.int32), params=raw, ema_params=ema,
                             opt_state=(jax.tree_util.tree_map(np.zeros_like, raw),))
    workdir = tmp_path / "run"
    with checkpoints.open_manager(workdir) as mngr:
        checkpoints.save(mngr, 2, small_state(), config=run_config(hidden_size=64))
        checkpoints.save(mngr, 4, state, config=config)
    for weights, expected in (("ema", ema), ("raw", raw)):
        params, cfg, saved = checkpoints.load(workdir, weights)
        assert cfg.hidden_size == 32 and cfg.dropout == 0.1 and saved["train"]["lr"] == 3e-3
        assert checkpoints.model_fingerprint(cfg) == checkpoints.model_fingerprint(model)
        assert_trees_equal(params, expected)
    params, _, _ = checkpoints.load(workdir / "4", "raw")  # a step directory
    assert_trees_equal(params, raw)

    converted = tmp_path / "converted"
    checkpoints.export_params(converted, raw, ema, model, step=11)
    for weights, expected in (("ema", ema), ("raw", raw)):
        params, cfg, saved = checkpoints.load(converted, weights)
        assert saved is None  # an export carries no run config
        assert checkpoints.model_fingerprint(cfg) == checkpoints.model_fingerprint(model)
        assert_trees_equal(params, expected)
    with pytest.raises(FileNotFoundError):
        checkpoints.load(tmp_path / "nowhere")
