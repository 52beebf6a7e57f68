"""Shared test helpers: tiny configs, random parameters, the compilation cache, a shared tiny run.

The suite is compile-bound, so every test process (the xdist workers and the subprocesses
they start, through the environment) shares one persistent XLA compilation cache
(`FMLM_JAX_TEST_CACHE`, default .jax_cache/ in the repository, git-ignored): a program that
another test or an earlier run compiled is loaded instead of compiled again. Unless XLA_FLAGS
is set, programs are compiled with XLA:CPU's cheap settings (no expensive LLVM passes): the
suite's programs are small and run briefly, so compile time is what counts (-25% here).
"""

import contextlib
import json
import os

import filelock
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
CONFIGS = os.path.join(ROOT, "configs")
FIXTURES = os.path.join(TESTS, "fixtures")

CACHE = os.environ.setdefault("FMLM_JAX_TEST_CACHE", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)  # subprocesses inherit these
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("XLA_FLAGS",
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from fmlm_jax import config as fmlm_config  # noqa: E402
from fmlm_jax.data.synthetic import WordTokenizer  # noqa: E402
from fmlm_jax.model import init_params, model_config  # noqa: E402

# CI sets FMLM_JAX_REQUIRE_ASSETS=1: a test that would skip for a missing offline asset
# package (a missed install step) fails instead.
REQUIRE_ASSETS = os.environ.get("FMLM_JAX_REQUIRE_ASSETS") == "1"


def skip_or_fail(reason: str):
    if REQUIRE_ASSETS:
        pytest.fail(f"{reason} (FMLM_JAX_REQUIRE_ASSETS=1: assets must be installed)")
    pytest.skip(reason)


def tiny_model_config(**overrides) -> ml_collections.ConfigDict:
    """A few-thousand-parameter DiT for fast tests (vocab 23, width 32, 2 blocks)."""
    base = dict(vocab_size=23, hidden_size=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)
    base.update(overrides)
    vocab = base.pop("vocab_size")
    return model_config("tiny", vocab, **base)


def synthetic_model(**overrides) -> ml_collections.ConfigDict:
    """`tiny_model_config` with the vocabulary of the built-in synthetic phrases (K = 46)."""
    return tiny_model_config(**{"vocab_size": len(WordTokenizer()), **overrides})


def run_config(mode: str = "flm", model=None, **groups) -> ml_collections.ConfigDict:
    """A complete run config (`fmlm_jax.config.defaults(mode)`) on the synthetic phrases with a
    tiny model (`synthetic_model`) and the given group updates, e.g.
    run_config("fmlm", train=dict(lr=1e-3), distill=dict(method="lsd"))."""
    config = fmlm_config.defaults(mode)
    config.model = model if model is not None else synthetic_model(two_time=mode == "fmlm")
    config.data.update(source="synthetic", seq_len=8, batch_size=8)
    config.train.update(num_steps=4, warmup_steps=2, log_every=2, save_every=2)
    for group, values in groups.items():
        if isinstance(values, dict):
            config[group].update(values)
        else:
            config[group] = values
    return fmlm_config.validate(config)


def load_config(name: str, variant: str = "") -> ml_collections.ConfigDict:
    """configs/NAME.py[:VARIANT], validated."""
    return fmlm_config.load(os.path.join(CONFIGS, f"{name}.py") + (f":{variant}" if variant else ""))


def randomize(params, rng):
    """Every parameter random, adaLN and the output layer included, at scales that keep
    activations O(1) so outputs depend on the input: matrices N(0, 1/fan_in), LayerNorm
    scales 1 + N(0, 0.2²), biases N(0, 0.2²)."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(rng, len(paths_leaves))
    out = []
    for key, (path, x) in zip(keys, paths_leaves, strict=False):
        noise = jax.random.normal(key, x.shape, x.dtype)
        if x.ndim == 2:
            out.append(noise / np.sqrt(x.shape[0]))
        elif getattr(path[-1], "key", None) == "scale":
            out.append(1.0 + 0.2 * noise)
        else:
            out.append(0.2 * noise)
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture
def random_tiny_params():
    def make(config, seed=0):
        return randomize(init_params(config, jax.random.key(seed)), jax.random.key(seed + 1))

    return make


def posterior_mean(x, t, data, k: int):
    """The exact denoiser D_t(x) (B, L, K) of a dataset of token sequences `data` (M, L)
    drawn uniformly: the posterior mean of the one-hots given x = t·one-hot + (1 − t)·ε,
    t (B,) < 1."""
    onehots = jax.nn.one_hot(data, k)
    logits = jnp.einsum("blk,mlk->bm", x, onehots) * (t / (1.0 - t) ** 2)[:, None]
    return jnp.einsum("bm,mlk->blk", jax.nn.softmax(logits, axis=-1), onehots)


def rk4_flow(denoiser, x, s, t, steps: int):
    """X_{s,t}(x): RK4 with `steps` steps on dx/dr = (D_r(x) − x)/(1 − r), s, t (B,)."""
    h = (t - s) / steps
    rows = lambda v: v[:, None, None]  # noqa: E731

    def v(x, r):
        return (denoiser(x, r) - x) / rows(1.0 - r)

    def step(i, x):
        r = s + i * h
        k1 = v(x, r)
        k2 = v(x + rows(h / 2) * k1, r + h / 2)
        k3 = v(x + rows(h / 2) * k2, r + h / 2)
        k4 = v(x + rows(h) * k3, r + h)
        return x + rows(h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)

    return jax.lax.fori_loop(0, steps, step, x)


def to_np(x):
    return np.asarray(jnp.asarray(x))


def quiet(*_):
    pass


@contextlib.contextmanager
def _shared(tmp_path_factory, name: str):
    """A directory made once per test session across xdist workers (file lock + done marker)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    path = root / name
    with filelock.FileLock(str(path) + ".lock"):
        yield path, (path / ".done").exists()
        (path / ".done").touch()


def tiny_run_configs(root) -> tuple:
    """The shared tiny run: an FLM (8 steps, synthetic data, dropout 0) and an FMLM (PSD,
    4 steps) distilled from it; workdirs ROOT/flm and ROOT/fmlm."""
    flm = run_config("flm", model=synthetic_model(n_blocks=1),
                     train=dict(num_steps=8, save_every=4, log_every=4, keep_last=5, eval_every=4,
                                eval_batches=1, sample_every=8, sample_num=3, sample_steps=2))
    fmlm = run_config("fmlm", model=synthetic_model(n_blocks=1, two_time=True),
                      train=dict(num_steps=4, save_every=2, log_every=2, eval_every=2, eval_batches=1,
                                 sample_every=4, sample_num=2),
                      distill=dict(teacher_path=str(root / "flm"), boundary_prob=4.0))
    return flm, fmlm


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """{'flm', 'fmlm': workdir, 'flm_rows', 'fmlm_rows': logged metric rows, 'configs'}: trained
    once per session and read by the checkpoint, evaluation, conversion and CLI tests."""
    from fmlm_jax import train

    with _shared(tmp_path_factory, "tiny_run") as (root, done):
        flm, fmlm = tiny_run_configs(root)
        if not done:
            rows = {"flm": train.train_and_evaluate(flm, str(root / "flm"), log=quiet),
                    "fmlm": train.train_and_evaluate(fmlm, str(root / "fmlm"), log=quiet)}
            (root / "rows.json").write_text(json.dumps(rows))
        rows = json.loads((root / "rows.json").read_text())
    return {"flm": str(root / "flm"), "fmlm": str(root / "fmlm"), "flm_rows": rows["flm"],
            "fmlm_rows": rows["fmlm"], "configs": (flm, fmlm)}
