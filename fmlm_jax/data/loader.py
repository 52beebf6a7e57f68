"""What a run reads: `make_iterator(config, split)` and `run_tokenizer(config)`.

The loop and validation call these with the run config; they route `data.source`:
  synthetic  the built-in phrases (fmlm_jax.data.synthetic), an endless random-access stream;
  prepared   ArrayRecord blocks written by `python -m fmlm_jax.data.prepare` (fmlm_jax.data.pipeline).
Each process reads its own shard (`jax.process_index()` of `jax.process_count()`) with
`data.batch_size / process_count` rows; the iterator's position is checkpointable.
"""

from __future__ import annotations

import grain
import jax

from fmlm_jax.data import pipeline, synthetic, tokenizers


def process_batch_size(config) -> int:
    """This process's share of the global batch, after checking that it splits evenly."""
    global_batch, processes = int(config.data.batch_size), jax.process_count()
    if global_batch % processes:
        raise ValueError(f"data.batch_size {global_batch} (the global batch) must be divisible by the "
                         f"{processes} processes")
    return global_batch // processes


def make_iterator(config, split: str = "train"):
    """This process's batches {'tokens': (B/P, L) int32} of `split` ('train' or the validation split)."""
    source = config.data.source
    batch = process_batch_size(config)
    index, count = jax.process_index(), jax.process_count()
    if source == "synthetic":  # each process and split its own seed
        words = len(synthetic.WordTokenizer())
        if config.model.vocab_size != words:
            raise ValueError(f"data.source='synthetic' has {words} words but model.vocab_size is "
                             f"{config.model.vocab_size}; set model.vocab_size={words}")
        seed = config.seed + 1000 * index + (0 if split == "train" else 1)
        ds = synthetic.dataset(batch, config.data.seq_len, seed)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
    if source == "prepared":
        if not config.data.dir:
            raise ValueError("data.source='prepared' needs data.dir (a directory written by "
                             "python -m fmlm_jax.data.prepare)")
        return pipeline.make_iterator(config.data.dir, split, config.data.seq_len, batch, config.seed,
                                      shard_index=index, shard_count=count, shuffle=split == "train",
                                      vocab_size=config.model.vocab_size)
    raise ValueError(f"data.source must be 'synthetic' or 'prepared', got {source!r}")


def run_tokenizer(config):
    """The model's tokenizer for a run: the synthetic word tokenizer, or `data.tokenizer`
    (default: the one the prepared data names), sized to `model.vocab_size`. Decode its
    samples with `tokenizers.decode`."""
    if config.data.source == "synthetic":
        name = synthetic.TOKENIZER_NAME
    elif config.data.tokenizer:
        name = config.data.tokenizer
    else:  # the tokenizer the data was prepared with
        name = pipeline.load_meta(config.data.dir, "train", config.data.seq_len)["tokenizer"]
    return tokenizers.load_model_tokenizer(name, config.model.vocab_size)
