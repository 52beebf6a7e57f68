"""Grain input pipeline over prepared ArrayRecord blocks (see `fmlm_jax.data.prepare`).

    ds = make_dataset("data/lm1b", "train", seq_len=128, batch_size=512 // n_proc, seed=0,
                      shard_index=jax.process_index(), shard_count=jax.process_count())
    it = make_iterator(...)       # same arguments; or iter(ds): a grain DatasetIterator
    batch = next(it)              # {'tokens': (B, L) int32}, what flm_loss takes
    state = it.get_state()        # a small JSON-able dict: save it with the model
    it.set_state(state)           # ... and restore it: the same batches follow
    # With Orbax, beside the train state (tested in tests/test_data.py):
    #   ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it))      # save
    #   ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(it))   # restore

Order: blocks → this process's shard (`ds[shard_index::shard_count]`) → global shuffle
with `seed` (a different permutation each epoch, grain's `shuffle` before `repeat`) →
repeat (`num_epochs=None`: forever) → decode → batch (B, L). Everything is index
arithmetic on a grain `MapDataset`, so the pipeline is deterministic given (seed,
shard_index, shard_count, batch_size) and its iterator state is just a position.
Wrapped data has no padding, so `'mask'` (all ones) is only added on request.
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np

from fmlm_jax.data import prepare as prepare_lib


def load_meta(data_dir: str, split: str, seq_len: int | str = "L") -> dict:
    """meta.json of a prepared split; a clear error naming the preparation command if absent."""
    split_dir = os.path.join(data_dir, split)
    meta_path = os.path.join(split_dir, "meta.json")
    if not os.path.isfile(meta_path):
        dataset = os.path.basename(os.path.normpath(data_dir))
        dataset = dataset if dataset in prepare_lib.DATASETS else "lm1b|owt|text"
        raise FileNotFoundError(
            f"no prepared data at {split_dir} (missing {meta_path}). Prepare it once with:\n  "
            + prepare_lib.prepare_command(dataset, split, seq_len, data_dir)
            + "\n(see `python -m fmlm_jax.data.prepare --help`)"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != prepare_lib.FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {meta.get('format_version')}, "
                         f"expected {prepare_lib.FORMAT_VERSION}; prepare it again")
    return meta


class _Decode(grain.transforms.Map):
    """Record bytes → (L,) int32 token ids."""

    def __init__(self, dtype: str, seq_len: int):
        self.dtype, self.seq_len = np.dtype(dtype), seq_len

    def map(self, record: bytes) -> np.ndarray:
        ids = np.frombuffer(record, dtype=self.dtype)
        if ids.shape != (self.seq_len,):
            raise ValueError(f"record holds {ids.size} tokens, expected {self.seq_len}")
        return ids.astype(np.int32)


def _to_batch(tokens: np.ndarray, with_mask: bool) -> dict:
    batch = {"tokens": tokens}
    if with_mask:
        batch["mask"] = np.ones(tokens.shape, np.float32)
    return batch


def make_dataset(data_dir: str, split: str, seq_len: int, batch_size: int, seed: int = 0, *,
                 shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = True,
                 vocab_size: int | None = None, with_mask: bool = False) -> grain.MapDataset:
    """A grain MapDataset of {'tokens': (B, L) int32} batches for one process.

    batch_size is per process (global batch / shard_count). `iter(ds)` gives a
    checkpointable iterator (`get_state` / `set_state`). vocab_size, if given, must match
    the tokenizer the data was prepared with.
    """
    meta = load_meta(data_dir, split, seq_len)
    split_dir = os.path.join(data_dir, split)
    if meta["seq_len"] != seq_len:
        raise ValueError(f"{split_dir} was prepared with seq_len {meta['seq_len']}, but seq_len {seq_len} "
                         f"was asked for; prepare it again with --seq-len={seq_len} (into another --out)")
    if vocab_size is not None and meta["vocab_size"] != vocab_size:
        raise ValueError(f"{split_dir} was tokenized with {meta['tokenizer']} (vocab {meta['vocab_size']}) "
                         f"but the model has vocab {vocab_size}; point data_dir at data prepared with the "
                         "model's tokenizer, or set the model's vocab_size to match")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if meta["num_blocks"] == 0:
        raise ValueError(f"{split_dir} holds no blocks (too little text for seq_len {seq_len})")
    paths = [os.path.join(split_dir, f) for f in meta["files"]]
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
    ds = ds[shard_index::shard_count]
    if len(ds) < batch_size and drop_remainder:
        raise ValueError(f"shard {shard_index}/{shard_count} of {split_dir} has {len(ds)} blocks, "
                         f"fewer than one batch of {batch_size}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(_Decode(meta["dtype"], seq_len))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(lambda tokens: _to_batch(tokens, with_mask))


def make_iterator(data_dir: str, split: str, seq_len: int, batch_size: int, seed: int = 0,
                  state: dict | None = None, num_threads: int = 4, prefetch: int = 8,
                  **kwargs) -> grain.DatasetIterator:
    """An iterator over `make_dataset(...)`, restored to `state` (from `get_state()`) if given.

    num_threads / prefetch: grain's ReadOptions (threads decoding records, batches read
    ahead); grain's own defaults (16 / 500) hold hundreds of batches in memory.
    """
    ds = make_dataset(data_dir, split, seq_len, batch_size, seed, **kwargs)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
    if state is not None:
        it.set_state(state)
    return it
