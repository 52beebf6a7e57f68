import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fmlm_jax.model import model_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def tiny_model_config(**overrides) -> ml_collections.ConfigDict:
    """A few-thousand-parameter DiT for fast tests (vocab 23, width 32, 2 blocks)."""
    base = dict(vocab_size=23, hidden_size=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)
    base.update(overrides)
    vocab = base.pop("vocab_size")
    return model_config("tiny", vocab, **base)


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
    from fmlm_jax.model import init_params

    def make(config, seed=0):
        return randomize(init_params(config, jax.random.key(seed)), jax.random.key(seed + 1))

    return make


def to_np(x):
    return np.asarray(jnp.asarray(x))
