"""Reading Hugging Face checkpoints without transformers: config.json plus the weight files.

A checkpoint is a local directory (or a hub name, fetched with huggingface_hub) holding
`config.json` and one of, in this order of preference:

  model.safetensors                                          one safetensors file
  model.safetensors.index.json + model-0000x-of-0000y.safetensors   sharded safetensors
  pytorch_model.bin                                          the legacy torch pickle (needs torch)
  pytorch_model.bin.index.json + pytorch_model-0000x-of-0000y.bin  sharded legacy pickle

`load_checkpoint` returns a flat {name: float32 numpy array} dict and the parsed config.json.
Names are normalized in one way (`normalize_name`): one leading head-model prefix
(`transformer.`, `bert.`, `model.`) is stripped, so a GPT2LMHeadModel's
`transformer.h.0.ln_1.weight` and a bare GPT2Model's `h.0.ln_1.weight` both read
`h.0.ln_1.weight`; the pre-2019 TensorFlow-port names `LayerNorm.gamma` / `LayerNorm.beta`
read `LayerNorm.weight` / `LayerNorm.bias`. Head tensors keep their names (`lm_head.weight`,
`classifier.weight`). Integer and boolean buffers (e.g. BERT's `position_ids`) are dropped.

`params_from_table` turns the flat dict into a Flax parameter tree through an explicit
name table (HF name → Flax path, transposed or not), checking every shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

PREFIXES = ("transformer.", "bert.", "model.")
LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}  # only under a LayerNorm (see normalize_name)

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Only the files this module reads: a hub repository also holds TF, Flax, ONNX, ... weights.
HUB_PATTERNS = ["config.json", SAFETENSORS, SAFETENSORS_INDEX, "model-*-of-*.safetensors"]
HUB_LEGACY_PATTERNS = ["config.json", TORCH_BIN, TORCH_BIN_INDEX, "pytorch_model-*-of-*.bin"]

# safetensors dtype codes → numpy; parsed directly because safetensors' numpy backend
# cannot return bfloat16, the dtype most recent checkpoints are stored in.
_SAFETENSORS_FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}

# One table entry: (HF tensor name after normalize_name, Flax path, transpose the weight).
NameTable = Sequence[tuple[str, tuple[str, ...], bool]]


def normalize_name(name: str) -> str:
    """The one normalization of HF tensor names: strip one leading `transformer.` / `bert.` /
    `model.` and rename a LayerNorm's legacy `gamma` / `beta` to `weight` / `bias`."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    for old, new in LEGACY_SUFFIXES.items():
        if name.endswith(old) and "LayerNorm" in name:
            name = name[: -len(old)] + new
    return name


def resolve(name_or_dir: str | os.PathLike) -> str:
    """A local checkpoint directory: `name_or_dir` itself if it is a directory, else a hub
    name fetched (config and weights only) with huggingface_hub.snapshot_download."""
    path = os.path.expanduser(os.fspath(name_or_dir))
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1:  # a path, not a name
        raise FileNotFoundError(
            f"{path} is not a checkpoint directory: pass a directory holding config.json and "
            f"{SAFETENSORS} (or {TORCH_BIN}), or a Hugging Face hub name such as 'gpt2'"
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(path, allow_patterns=HUB_PATTERNS)
        if not _weight_files(local):  # an older repository with only the torch pickle
            local = snapshot_download(path, allow_patterns=HUB_LEGACY_PATTERNS)
    except Exception as e:  # noqa: BLE001 - offline, unknown repository, gated, ...
        raise FileNotFoundError(
            f"could not fetch '{path}' from the Hugging Face hub ({type(e).__name__}: "
            f"{' '.join(str(e).split())}); without network access, pass a local directory holding "
            f"config.json and {SAFETENSORS} or {TORCH_BIN} instead (e.g. one written by "
            "transformers' save_pretrained)"
        ) from e
    return local


def read_config(directory: str) -> dict:
    """The parsed config.json of a checkpoint directory."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} has no config.json: pass a Hugging Face checkpoint directory (config.json "
            "plus weights, as written by save_pretrained)"
        )
    with open(path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config


def check_model_type(config: Mapping, expected: str, path: str) -> None:
    """Refuses a config.json whose model_type is not `expected`, naming the loader to use."""
    loaders = {"gpt2": "load_gpt2", "bert": "load_bert"}
    model_type = config.get("model_type")
    if model_type == expected:
        return
    if model_type in loaders:
        fix = f"use fmlm_jax.textmodels.{loaders[model_type]} for it"
    else:
        fix = "supported model types: gpt2 (load_gpt2) and bert (load_bert)"
    raise ValueError(f"{path}: config.json has model_type {model_type!r}, not {expected!r}; {fix}")


def _weight_files(directory: str) -> list[str]:
    """The weight files of a checkpoint directory, by the preference order above; [] if none."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
        if os.path.isfile(os.path.join(directory, index)):
            with open(os.path.join(directory, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
            if missing:
                raise FileNotFoundError(f"{directory}: {index} lists shards that are missing: {missing}")
            return [os.path.join(directory, s) for s in shards]
    return []


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Floating tensors of one safetensors file as float32 (file layout: an 8-byte
    little-endian header length, a JSON header of dtype/shape/byte offsets, the raw data)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in _SAFETENSORS_FLOATS:
            continue  # integer / boolean buffers
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=_SAFETENSORS_FLOATS[info["dtype"]])
        out[name] = array.reshape(info["shape"]).astype(np.float32)
    return out


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """Floating tensors of a legacy pytorch_model.bin as float32 (weights-only unpickling)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a legacy torch pickle and reading it needs torch (pip install -e '.[torch]'); "
            "or convert the checkpoint to model.safetensors"
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items() if torch.is_floating_point(v)}


def read_tensors(directory: str) -> dict[str, np.ndarray]:
    """All floating tensors of a checkpoint directory, float32, names normalized."""
    files = _weight_files(directory)
    if not files:
        raise FileNotFoundError(
            f"{directory} has no weights: expected {SAFETENSORS} (or sharded model-0000x-of-0000y."
            f"safetensors with {SAFETENSORS_INDEX}) or the legacy {TORCH_BIN}; save the model "
            "with save_pretrained"
        )
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        raw = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch_bin(path)
        for name, array in raw.items():
            key = normalize_name(name)
            if key in tensors:
                raise ValueError(f"{path}: tensor {name!r} and another tensor both read as {key!r}")
            tensors[key] = array
    return tensors


def load_checkpoint(name_or_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """({normalized name: float32 array}, config.json dict) of a local directory or hub name."""
    directory = resolve(name_or_dir)
    config = read_config(directory)
    return read_tensors(directory), config


def params_from_table(tensors: Mapping[str, np.ndarray], table: NameTable, shapes: Any,
                      source: str = "checkpoint") -> dict:
    """The nested Flax parameter dict that `table` maps `tensors` to.

    shapes: the module's parameter tree of shapes (e.g. `jax.eval_shape(module.init, ...)
    ['params']`); every table entry must exist in `tensors` with the (transposed) shape there.
    Tensors the table does not name are ignored (the caller decides which may be).
    """
    missing = [name for name, _, _ in table if name not in tensors]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}; "
                         "is it a checkpoint of this architecture, with the sizes of its config.json?")
    params: dict = {}
    for name, path, transpose in table:
        array = tensors[name].T if transpose else tensors[name]
        expected = shapes
        for key in path:
            expected = expected[key]
        if tuple(array.shape) != tuple(expected.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tensors[name].shape}, the model built "
                             f"from config.json expects {tuple(expected.shape)} at {'/'.join(path)}"
                             f"{' (transposed)' if transpose else ''}; config.json and the weights disagree")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(array, dtype=np.float32)
    return params


def unused(tensors: Iterable[str], table: NameTable) -> list[str]:
    """Tensor names the table does not read, sorted."""
    used = {name for name, _, _ in table}
    return sorted(set(tensors) - used)
