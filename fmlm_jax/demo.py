"""The first main job: train a tiny FLM on synthetic phrases and sample from it.

python -m fmlm_jax.demo --config=configs/synthetic_demo.py [--config.train.num_steps=N]
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app
from ml_collections import config_flags

from fmlm_jax import sampling, train
from fmlm_jax.data import synthetic

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.",
                                          lock_config=True)


def run(config, log=print) -> dict:
    """Trains, then samples with the EMA weights. Returns losses and sample quality."""
    tokenizer = synthetic.WordTokenizer()
    if len(tokenizer) != config.model.vocab_size:
        raise ValueError(f"model.vocab_size is {config.model.vocab_size} but the synthetic "
                         f"vocabulary has {len(tokenizer)} words")
    init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 3)
    state = train.create_train_state(config, init_rng)
    step_fn = train.jit_train_step(config)
    data = synthetic.batches(config.data.batch_size, config.data.seq_len, config.seed, tokenizer)

    losses = []
    start = time.time()
    for step in range(1, config.train.num_steps + 1):
        state, metrics = step_fn(state, next(data), train_rng)
        if step % config.train.log_every == 0 or step == config.train.num_steps:
            losses.append((step, float(metrics["loss"])))
            log(f"step {step:5d}  loss {losses[-1][1]:.4f}  ({time.time() - start:.1f}s)")

    quality = {}
    shape = (config.sample.num_samples, config.data.seq_len, config.model.vocab_size)
    z0 = jax.random.normal(sample_rng, shape)
    for num_steps in config.sample.steps:
        ids = np.asarray(sampling.flm_sample(state.ema_params, config.model, z0, num_steps))
        quality[num_steps] = synthetic.valid_bigram_fraction(ids, tokenizer)
        log(f"\n{num_steps} Euler steps: {100 * quality[num_steps]:.1f}% of bigrams occur in "
            "the corpus; samples:")
        for row in ids[:3]:
            log("  " + tokenizer.decode(row))
    return {"losses": losses, "valid_bigrams": quality, "params": state.ema_params}


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("pass --config=configs/synthetic_demo.py")
    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
