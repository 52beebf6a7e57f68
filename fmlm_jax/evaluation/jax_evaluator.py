"""Generative-perplexity scoring in JAX: a GPT-2-architecture evaluator run by the Flax GPT-2 of
fmlm_jax.textmodels (the `backend='jax'` of `gen_ppl`; SPEC §8).

    evaluator, seconds = load_evaluator("gpt2-large", dtype="float32")   # or a local directory
    nll = row_nll(evaluator, rows, batch_size=8, chunk_size=1024)       # (N,) float64

`rows` are the chunk rows `gen_ppl` cuts from the re-tokenized samples, (ids, counted mask)
pairs; `row_nll` returns each row's Σ NLL over its counted positions, the same quantity the
torch backend computes, so `gen_ppl` applies one protocol to either backend:

  - rows are right-padded with EOS under attention mask 0 (as the torch backend); causal
    attention keeps a real position independent of the pads, and pads are never counted;
  - every batch is padded to a fixed shape, (R, W): R = batch_size rows rounded up to a
    multiple of 8 and of the device count (missing rows are all padding; fewer when there
    are fewer rows in all) and W the smallest power of two ≥ the batch's longest row (at
    least 8, at most chunk_size), so a run compiles the jitted scorer once per width bucket,
    not once per batch, and a row's result does not depend on its batch-mates;
  - with several local devices the batch is sharded over a ('data',) mesh and the parameters
    are replicated (each process scores its own texts on its own devices); batches are
    dispatched asynchronously and read back at the end;
  - NLL = logsumexp(logits) − logit[target] in float32 (the logits are float32 whatever the
    compute dtype), masked and summed in float64 on the host;
  - dtype 'float32' runs the matmuls at 'highest' precision (torch's float32: no TF32 on
    GPU); 'bfloat16' runs them in bfloat16 with float32 parameters, LayerNorms, softmax
    statistics and logits.

Only GPT-2-architecture evaluators (config.json model_type 'gpt2') are supported; any other
architecture, and every GGUF file, is refused with a ValueError that names it: use the torch
backend for those. The tokenizer is the evaluator's own (transformers.AutoTokenizer), as in
the torch backend, so both backends score the same ids.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fmlm_jax.textmodels import gpt2

DTYPES = ("float32", "bfloat16")
MIN_WIDTH = 8  # the smallest width bucket
ROW_MULTIPLE = 8  # a batch's row count is padded to a multiple of this (and of the device count)
_INSTALL_HINT = 'the JAX evaluator reads the tokenizer with transformers: pip install -e ".[eval]"'

Row = tuple[Sequence[int], Sequence[bool]]  # one chunk: its ids and its counted-position mask


def import_transformers():
    try:
        import transformers
    except ImportError as e:  # transformers is part of the optional `eval` extra
        raise ImportError(f"{_INSTALL_HINT} (import failed: {e})") from e
    return transformers


@dataclasses.dataclass(frozen=True)
class JaxEvaluator:
    """A loaded evaluator: its tokenizer, the Flax module and parameters (replicated over
    `mesh` when there is one), and `nll`, the jitted per-position NLL (see `token_nll`)."""

    tokenizer: Any
    module: gpt2.GPT2LMHeadModel
    params: Any
    mesh: Mesh | None
    nll: Callable[[Any, jax.Array, jax.Array], jax.Array]

    @property
    def context(self) -> int:
        return self.module.config.n_positions

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size


def token_nll(module: gpt2.GPT2LMHeadModel, params: Any, input_ids: jax.Array,
              attention_mask: jax.Array) -> jax.Array:
    """Per-position NLL of a padded batch: input_ids, attention_mask (R, W) → (R, W-1) float32,
    entry j-1 = −log p(token j | tokens < j), position j-1 predicting token j.

    logsumexp − the target's logit is log-softmax + gather without materializing the
    (R, W, V) log-probabilities."""
    logits = module.apply({"params": params}, input_ids, attention_mask=attention_mask)[:, :-1]
    target = jnp.take_along_axis(logits, input_ids[:, 1:, None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target


def data_mesh(devices: Sequence[Any] | None = None) -> Mesh | None:
    """A ('data',) mesh over `devices` (default: this process's devices of the default
    backend), or None for one device (nothing to shard)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if len(devices) == 1:
        return None
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


@functools.lru_cache(maxsize=16)
def model_type(path: str, gguf_file: str | None = None) -> str:
    """The architecture of an evaluator: config.json's model_type (read by transformers, so a
    hub name fetches only its config), or a GGUF file's `general.architecture` ('GGUF' when
    the gguf package cannot read it)."""
    if gguf_file is not None:
        try:
            import gguf

            reader = gguf.GGUFReader(os.path.join(path, gguf_file))
            return f"GGUF {reader.fields['general.architecture'].contents()}"
        except Exception:  # noqa: BLE001 - gguf missing or an unreadable file: refused all the same
            return "GGUF"
    return import_transformers().AutoConfig.from_pretrained(path).model_type


def supports(path: str, gguf_file: str | None = None) -> bool:
    """Whether the JAX backend can run this evaluator: a GPT-2-architecture checkpoint, not GGUF."""
    return gguf_file is None and model_type(path) == "gpt2"


def check_gpt2(evaluator: str, path: str, gguf_file: str | None = None) -> None:
    """ValueError unless `evaluator` is a GPT-2-architecture checkpoint the JAX backend can run."""
    if not supports(path, gguf_file):
        raise ValueError(
            f"evaluator {evaluator!r} is a {model_type(path, gguf_file)} model; the JAX evaluator backend "
            "runs GPT-2-architecture checkpoints only (model_type 'gpt2': gpt2, gpt2-medium, gpt2-large, "
            "gpt2-xl or a local GPT-2 directory, not GGUF files): pass backend='torch' to score with it"
        )


@functools.lru_cache(maxsize=4)
def load_evaluator(path: str, gguf_file: str | None = None, dtype: str = "float32",
                   evaluator: str | None = None) -> tuple[JaxEvaluator, float]:
    """(evaluator, seconds it took to load), loaded once per arguments and cached.

    path: a local GPT-2 directory or a hub name (`gen_ppl.resolve_evaluator`'s first value);
    gguf_file: the GGUF file name inside `path` (always refused); evaluator: the name to quote
    in errors (default `path`)."""
    if dtype not in DTYPES:
        raise ValueError(f"the JAX evaluator runs in {' or '.join(DTYPES)}, got dtype={dtype!r}; "
                         "pass one of these, or backend='torch' for other dtypes")
    transformers = import_transformers()
    start = time.perf_counter()
    check_gpt2(evaluator or path, path, gguf_file)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"evaluator {evaluator or path!r} has a tokenizer without an EOS token; generative perplexity "
            "pads with and counts the first EOS (SPEC §8): use a causal LM whose tokenizer sets eos_token"
        )
    # float32 as torch's float32 (no reduced-precision passes on GPU/TPU); bfloat16 as is.
    precision = "highest" if dtype == "float32" else None
    module, params, _ = gpt2.load_gpt2(path, dtype=dtype, precision=precision)
    mesh = data_mesh()
    if mesh is not None:
        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    nll = jax.jit(functools.partial(token_nll, module))
    return JaxEvaluator(tokenizer, module, params, mesh, nll), time.perf_counter() - start


def bucket_width(width: int, chunk_size: int) -> int:
    """The padded width of a batch whose longest row has `width` tokens: the smallest power
    of two ≥ width, at least MIN_WIDTH and at most chunk_size (a few shapes, few compiles)."""
    return min(max(MIN_WIDTH, 1 << (width - 1).bit_length()), chunk_size)


def pad_batch(batch: Sequence[Row], num_rows: int, width: int, eos_id: int) -> tuple[np.ndarray, ...]:
    """(input_ids (R, W) int32, attention_mask (R, W) int32, counted (R, W) bool) of `batch`,
    right-padded with EOS to W = width and with all-padding rows to R = num_rows."""
    input_ids = np.full((num_rows, width), eos_id, np.int32)
    attention = np.zeros((num_rows, width), np.int32)
    counted = np.zeros((num_rows, width), bool)
    for r, (ids, mask) in enumerate(batch):
        input_ids[r, : len(ids)] = ids
        attention[r, : len(ids)] = 1
        counted[r, : len(ids)] = mask
    return input_ids, attention, counted


def row_nll(evaluator: JaxEvaluator, rows: Sequence[Row], batch_size: int, chunk_size: int,
            eos_id: int) -> np.ndarray:
    """Σ NLL over the counted positions of each row (N,) float64, scored `batch_size` rows at a
    time (rows longer than chunk_size are not expected: gen_ppl cuts them)."""
    # Rows padded to a multiple of 8 (and of the device count, to shard evenly): fewer shapes
    # to compile, and batch sizes that round to the same count give bit-identical results
    # (XLA's matmul tiling, hence the float32 rounding, changes with the row count).
    multiple = math.lcm(ROW_MULTIPLE, evaluator.num_devices)
    num_rows = -(-min(batch_size, len(rows)) // multiple) * multiple
    sharding = None if evaluator.mesh is None else NamedSharding(evaluator.mesh, PartitionSpec("data"))
    pending = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        width = bucket_width(max(len(ids) for ids, _ in batch), chunk_size)
        input_ids, attention, counted = pad_batch(batch, num_rows, width, eos_id)
        # Dispatched without waiting: the host pads the next batch while the device scores this one.
        nll = evaluator.nll(evaluator.params, jax.device_put(input_ids, sharding),
                            jax.device_put(attention, sharding))
        pending.append((nll, counted[: len(batch)]))
    out = []
    for nll, counted in pending:
        nll = np.asarray(nll)[: len(counted)].astype(np.float64)
        out.append(np.where(counted[:, 1:], nll, 0.0).sum(-1))
    return np.concatenate(out) if out else np.zeros(0, np.float64)
