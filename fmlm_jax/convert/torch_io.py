"""Reading and writing the reference's checkpoints: Lightning `.ckpt` and HF-style `.safetensors`.

- reading: `read_torch_checkpoint` → `TorchCheckpoint` (tensors, EMA list, rotary buffer, the
  pickled run config as plain data), `checkpoint_config` (the model config inferred from the
  tensors, or a given one checked against them), `training_recipe` (legacy run-config names
  reported as FLM / FMLM-PSD), `load_torch` → (params, model config);
- writing: `params_to_torch`, `save_torch_checkpoint` (a `.ckpt` the reference loader accepts),
  `save_safetensors`. Every output is written beside its destination and renamed into place
  when complete (`fmlm_jax.atomic`).

torch is imported lazily (the optional `torch` extra); a `.ckpt` is never fully unpickled:
its tensors load with torch's safe (weights-only) loader, every other pickled object becomes an
inert placeholder, and a pickle that calls anything but a data constructor (os.system, eval,
subprocess.Popen, ...: see INERT_CALLABLES) is refused as unsafe (`errors.UnsafeCheckpointError`)
before torch reads it.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import dataclasses
import json
import os
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from fmlm_jax import atomic, errors
from fmlm_jax import model as model_lib
from fmlm_jax.convert.names import (
    ROTARY_BUFFER,
    TIME_FEATURES,
    describe_layout,
    params_from_state_dict,
    reference_names,
    rotary_inv_freq,
    state_dict_from_params,
    to_numpy,
)

# ============================================================================ constants

WEIGHTS = ("ema", "raw")
PRODUCER = "fmlm_jax.convert/1"  # recorded in the metadata of the safetensors files we write
# The tokenizer vocabularies of the published runs: named in vocabulary errors.
KNOWN_VOCABS = {
    30522: "bert-base-uncased, the LM1B models",
    50258: "gpt2 + [PAD], the OpenWebText models",
}
DEFAULT_EMA_DECAY = 0.9999  # the reference recipe's EMA decay (SPEC §4)
# The Lightning version the authors pin; `load_from_checkpoint` needs a version key.
LIGHTNING_VERSION = "2.5.2"
N_HEADS_HINT = (
    "the published checkpoints (lm1b_flm, lm1b_fmlm, owt_flm, owt_fmlm) are all DiT-small "
    "with 12 heads: pass n_heads=12 (--n-heads 12) or a config (--size small)"
)


# Which pickled globals a `.ckpt` may call (see `unsafe_calls`). A pickle is a small program:
# GLOBAL pushes any importable object; REDUCE calls the object below its argument tuple, and
# INST / OBJ (protocols 0-1) call one too; NEWOBJ makes an instance of a class without calling
# it (`cls.__new__(cls)`) and BUILD hands that instance its pickled state. Data is therefore
# rebuilt by NEWOBJ + BUILD (the released checkpoints' omegaconf configs and transformers
# tokenizer) or merely named (`ref_type=typing.Any`, `object_type=builtins.dict`); code runs
# only where the pickle *calls* something. So a call is allowed only of
#   - what torch's weights-only loader itself accepts (its tensor rebuilders, dtypes, ...), or
#   - INERT_CALLABLES: classes that only store the data they are called with, and numpy's
#     array / scalar rebuilders (an ndarray from a shape, a dtype and bytes), or
#   - the three calls that rebuild a type annotation (`_annotation`: typing.Dict[str, Any],
#     int | None, NoneType);
# every other call is refused by name, above all functions (os.system, posix.system,
# builtins.eval / exec / getattr, subprocess.Popen, pickle.loads, ...), and also: a callable the
# pickle computes itself (a REDUCE on what another call or NEWOBJ returned: how a rebuilt
# functools.partial would run os.system), and copyreg._reconstructor (protocols 0-1), which calls
# `base.__init__` of whatever class it is given, subprocess.Popen's included. Nothing is
# imported or run to decide: the pickle is read statically (`scan_pickle`), before torch reads
# it. What is allowed still never runs either: the globals torch's loader refuses become inert
# placeholders (`_placeholder_class`).
INERT_CALLABLES = frozenset(
    [f"builtins.{n}" for n in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes", "str",
                               "int", "float", "complex", "bool", "slice", "range", "object")]
    + [f"collections.{n}" for n in ("OrderedDict", "defaultdict", "deque", "Counter")]
    + [f"datetime.{n}" for n in ("date", "time", "datetime", "timedelta", "timezone")]
    + ["decimal.Decimal", "fractions.Fraction", "uuid.UUID"]
    + [f"pathlib.{n}" for n in ("PurePath", "PurePosixPath", "PureWindowsPath", "Path", "PosixPath",
                                "WindowsPath")]
    + [f"numpy.{n}" for n in ("dtype", "ndarray")]
    + [f"numpy.{core}.multiarray.{n}" for core in ("core", "_core") for n in ("_reconstruct", "scalar")]
)
UNSAFE_FIX = "convert it with the authors' code or export safetensors"


# ============================================================================ reading torch


@dataclasses.dataclass
class TorchCheckpoint:
    """A reference checkpoint in memory: reference names (no `backbone.`), float32 numpy.

    tensors: the parameters in file order (teacher, non-backbone keys and the rotary
      buffer removed). ema: the EMA `shadow_params` list (reference parameter order) or
      None. inv_freq: the `rotary_emb.inv_freq` buffer when the file has it (it fixes
      head_dim = 2·len). weights_label: which weights a safetensors file says it holds.
    """

    tensors: collections.OrderedDict
    ema: list | None = None
    inv_freq: np.ndarray | None = None
    global_step: int = 0
    epoch: int = 0
    ema_decay: float | None = None
    ema_num_updates: int | None = None
    source: str = "<state dict>"
    format: str = "state-dict"  # 'lightning-ckpt' | 'safetensors' | 'state-dict'
    weights_label: str | None = None
    hyper_parameters: dict | None = None  # the pickled run config, as plain data (see `plain_data`)
    dropped: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)


def _require_torch(what: str):
    try:
        import torch
    except ImportError as e:  # torch is the optional `torch` extra
        raise ImportError(
            f"{what} needs torch: pip install -e '.[torch]' (a pinned CPU build is enough)"
        ) from e
    return torch


def _clean_key(key: str) -> str:
    """Strips torch.compile's `_orig_mod.` segments (SPEC §7)."""
    key = key.replace("._orig_mod.", ".")
    return key[len("_orig_mod."):] if key.startswith("_orig_mod.") else key


class PickleScan(NamedTuple):
    """What a pickle file names and calls (`scan_pickle`)."""

    globals: list  # every global it names, 'module.name'
    calls: list  # what it calls: a global's name, or COMPUTED_CALL


COMPUTED_CALL = "a callable built inside the pickle"
_MARK = object()  # pickle's MARK on the simulated stack
_STRINGS = ("UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
            "SHORT_BINSTRING")


class _Global(NamedTuple):
    name: str


def _global(module, name) -> _Global:
    """The global a pickle names, with Python 2's names mapped as the unpickler maps them
    (`__builtin__.set` is `builtins.set`)."""
    if not (isinstance(module, str) and isinstance(name, str)):
        return _Global("<a global named by computed strings>")
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return _Global(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")


def _annotation(callee, args) -> bool:
    """Whether a call rebuilds a type annotation (inert whatever it names): `typing.Dict[str,
    Any]` is operator.getitem on a typing global, `int | None` functools.reduce(operator.or_,
    ...), and NoneType builtins.type(None) (pickle's spelling of it)."""
    if not (isinstance(callee, _Global) and isinstance(args, tuple) and args):
        return False
    first = args[0].name if isinstance(args[0], _Global) else None
    if callee.name in ("operator.getitem", "_operator.getitem"):
        return len(args) == 2 and first is not None and first.startswith("typing.")
    if callee.name == "functools.reduce":
        return len(args) == 2 and first in ("operator.or_", "_operator.or_")
    return callee.name == "builtins.type" and len(args) == 1


def _pop(stack: list, op) -> list:
    """The operands `op` takes off the simulated stack (for a MARK-delimited op: the items
    above the mark, then those listed before it)."""
    before = op.stack_before
    if pickletools.markobject in before:
        mark = len(stack) - 1 - stack[::-1].index(_MARK)  # ValueError: no mark (not a pickle)
        taken, below = stack[mark + 1:], before.index(pickletools.markobject)
        del stack[mark:]
    else:
        taken, below = [], len(before)
    if below > len(stack):
        raise ValueError("pickle stack underflow")
    taken = stack[len(stack) - below:] + taken if below else taken
    del stack[len(stack) - below:]
    return taken


def _scan_one(f, scan: PickleScan) -> None:
    """Follows one pickle (to its STOP) on a simulated stack that holds globals and strings
    and nothing else: enough to tell what each REDUCE / INST / OBJ calls."""
    stack, memo = [], {}

    def call(callee) -> None:
        scan.calls.append(callee.name if isinstance(callee, _Global) else COMPUTED_CALL)

    for op, arg, _ in pickletools.genops(f):
        name = op.name
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):  # store the top, keep it
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            continue
        if name == "DUP":
            stack.append(stack[-1])
            continue
        operands = _pop(stack, op)
        if name == "MARK":
            pushed = _MARK
        elif name in ("GLOBAL", "INST"):
            pushed = _global(*str(arg).split(" ", 1))
            scan.globals.append(pushed.name)
            if name == "INST":  # INST calls the global with the marked arguments
                call(pushed)
                pushed = None
        elif name == "STACK_GLOBAL":
            pushed = _global(*operands)
            scan.globals.append(pushed.name)
        elif name in ("REDUCE", "OBJ"):  # REDUCE: callable, args; OBJ: class, *args
            if not (name == "REDUCE" and _annotation(*operands)):
                call(operands[0])
            pushed = None
        elif name in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE"):
            pushed = tuple(operands)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = memo.get(arg)
        elif name in ("EXT1", "EXT2", "EXT4"):  # copyreg's extension registry: a global by number
            pushed = _Global(f"<extension code {arg}>")
            scan.globals.append(pushed.name)
        elif name in _STRINGS:
            pushed = arg
        elif name == "BUILD":
            pushed = operands[0]
        else:
            stack.extend([None] * len(op.stack_after))
            continue
        stack.append(pushed)


def scan_pickle(path: str) -> PickleScan:
    """The globals a `.ckpt` names and what it calls, read statically (pickletools: nothing is
    imported or run). torch's zip format: its `data.pkl`; otherwise each pickle of the file in
    turn (torch's legacy format holds several); tensor bytes, garbage or EOF end the scan."""
    scan = PickleScan([], [])
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            for name in names:
                with archive.open(name) as f, contextlib.suppress(Exception):
                    _scan_one(f, scan)
        return scan
    with open(path, "rb") as f:
        with contextlib.suppress(Exception):  # the end of the pickles
            while True:
                _scan_one(f, scan)
    return scan


def _torch_refused(torch, path: str, scan: PickleScan) -> set[str]:
    """The globals of `scan` that torch's weights-only loader refuses."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # torch's zip format
    except Exception:  # noqa: BLE001 - a legacy or bare pickle: compare with torch's own allow-list
        allowed = getattr(torch._weights_only_unpickler, "_get_allowed_globals", dict)()
        return set(scan.globals) - set(allowed)
    # torch's spelling (placeholders need it) and the scan's (`__builtin__.eval` is builtins.eval)
    return set(names) | {_global(*name.rsplit(".", 1)).name for name in names if "." in name}


def unsafe_calls(scan: PickleScan, torch_refused: set[str]) -> list[str]:
    """The calls of `scan` that are refused (see INERT_CALLABLES), sorted."""
    return sorted({c for c in scan.calls
                   if c == COMPUTED_CALL or (c in torch_refused and c not in INERT_CALLABLES)})


def _refuse_unsafe(torch, path: str) -> list[str]:
    """UnsafeCheckpointError if the pickle calls anything but data constructors (before torch
    reads it); else the globals torch's loader refuses (to be replaced by placeholders)."""
    scan = scan_pickle(path)
    refused = _torch_refused(torch, path, scan)
    unsafe = unsafe_calls(scan, refused)
    if unsafe:
        raise errors.UnsafeCheckpointError(
            f"refusing to unpickle {', '.join(unsafe)} from {path}; {UNSAFE_FIX}")
    return sorted(refused)


def _torch_reason(error: BaseException) -> str:
    """torch's loader error in a few words, without its advice to load with weights_only=False
    or to allow-list a global "if you trust" it (either would run whatever the file holds)."""
    text = str(error)
    found = (re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
             or re.search(r"(Trying to load [^\n]*)", text))
    reason = " ".join((found.group(1) if found else text.strip().splitlines()[0] if text.strip() else
                       type(error).__name__).split())
    reason = re.split(r"\s*\b(?:Please use|You can use|If you trust|Check the documentation)\b", reason)[0]
    return "torch's safe loader refused it" if "weights_only" in reason or not reason else reason


def _unreadable(path: str, error: BaseException) -> ValueError:
    return ValueError(f"{path} is not a readable torch checkpoint ({_torch_reason(error)}); pass the "
                      "Lightning .ckpt or .safetensors file the reference wrote")


def _torch_load(path: str) -> dict:
    """torch.load with weights_only=True; pickled non-tensor objects are stubbed out.

    The released `.ckpt` files pickle their `hyper_parameters` (an omegaconf config and a
    transformers tokenizer): a plain weights-only load refuses them, and a full unpickle
    would need those packages and run code from the file. Instead each global the safe
    loader refuses is replaced by an inert placeholder class; tensors load as usual. A file
    whose pickle calls anything but data constructors is refused first, by name
    (UnsafeCheckpointError; see INERT_CALLABLES); torch is never retried unsafely.
    """
    torch = _require_torch("reading a .ckpt")
    refused = _refuse_unsafe(torch, path)
    stubs = [_placeholder_class(name) for name in refused if not name.startswith("<")]
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(stubs):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a bare pickle's
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a torch file, or still refused: one line, no advice
        raise _unreadable(path, e) from None
    if refused and isinstance(ckpt, dict):
        ckpt["__placeholders__"] = refused
    return ckpt


def _placeholder_class(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")

    def init(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def setstate(self, state):
        self.state = state

    return type(name, (), {"__module__": module, "__init__": init, "__setstate__": setstate,
                           "__repr__": lambda self: f"<placeholder {qualified}>"})


def _read_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # noqa: BLE001 - bf16 files need torch; anything else is fatal
        if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
        _require_torch("reading a bfloat16 safetensors file")
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    return tensors, metadata


def read_torch_checkpoint(src) -> TorchCheckpoint:
    """Reads a `.ckpt`, a `.safetensors` file, a checkpoint dict or a state dict.

    `src`: a path (a directory is searched for `model.safetensors`), a Lightning-style
    dict with a `state_dict` (and optionally `ema`), a bare {name: tensor} mapping, or a
    `TorchCheckpoint` (returned as is). Keys under `backbone.` are the model; `teacher*`
    and other non-backbone keys are dropped (listed in `.dropped`).
    """
    if isinstance(src, TorchCheckpoint):
        return src
    if isinstance(src, Mapping):
        return _from_mapping(src, "<state dict>", "state-dict")
    path = os.fspath(src)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        candidate = os.path.join(path, "model.safetensors")
        if not os.path.isfile(candidate):
            raise ValueError(
                f"{path} is a directory without model.safetensors; pass the .ckpt or "
                ".safetensors file (an Orbax directory goes to orbax-to-torch / load_orbax)"
            )
        path = candidate
    if path.endswith(".safetensors"):
        tensors, metadata = _read_safetensors(path)
        ck = _from_mapping(tensors, path, "safetensors")
        label = metadata.get("weights")
        ck.weights_label = label if label in WEIGHTS else None
        if "global_step" in metadata:
            ck.global_step = int(metadata["global_step"])
        return ck
    raw = _torch_load(path)
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{path} holds a {type(raw).__name__}, not a checkpoint dict or state dict"
        )
    return _from_mapping(raw, path, "lightning-ckpt" if "state_dict" in raw else "state-dict")


def _from_mapping(raw: Mapping, source: str, fmt: str) -> TorchCheckpoint:
    full = raw if "state_dict" in raw else None
    state = raw["state_dict"] if full is not None else raw
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: `state_dict` is a {type(state).__name__}, not a mapping")
    keys = {_clean_key(str(k)): k for k in state}
    if any(k.startswith("backbone.") for k in keys):
        names = {
            k[len("backbone."):]: orig for k, orig in keys.items() if k.startswith("backbone.")
        }
        dropped = sorted(k for k in keys if not k.startswith("backbone."))
    else:
        names, dropped = dict(keys), []
    dropped += sorted(k for k in names if k.startswith("teacher"))
    names = {k: v for k, v in names.items() if not k.startswith("teacher")}
    if "vocab_embed.embedding" not in names or "sigma_map.mlp.0.weight" not in names:
        sample = sorted(keys)[:6]
        raise ValueError(
            f"{source} is not a DiT checkpoint of this model family: no "
            f"`[backbone.]vocab_embed.embedding` / `sigma_map.mlp.0.weight` among its "
            f"{len(keys)} tensors (first keys: {sample}); expected the FLM/FMLM layout of SPEC §7"
        )
    tensors = collections.OrderedDict()
    inv_freq = None
    for name, orig in names.items():
        value = to_numpy(state[orig])
        if name == ROTARY_BUFFER:
            inv_freq = value
        else:
            tensors[name] = value
    ck = TorchCheckpoint(tensors=tensors, inv_freq=inv_freq, source=source, format=fmt,
                         dropped=dropped)
    if full is not None:
        ck.global_step = int(full.get("global_step", 0) or 0)
        ck.epoch = int(full.get("epoch", 0) or 0)
        ema = full.get("ema")
        if isinstance(ema, Mapping) and "shadow_params" in ema:
            ck.ema = [to_numpy(t) for t in ema["shadow_params"]]
            ck.ema_decay = float(ema["decay"]) if "decay" in ema else None
            ck.ema_num_updates = int(ema["num_updates"]) if "num_updates" in ema else None
        elif ema is not None:
            ck.notes.append("its `ema` entry has no shadow_params; treated as no EMA")
        for extra in ("ema_list", "shortcut_ema"):
            if extra in full:
                ck.notes.append(f"its `{extra}` (extra EMAs) is not converted")
        if full.get("hyper_parameters") is not None:
            ck.hyper_parameters = plain_data(full["hyper_parameters"])
        if full.get("__placeholders__"):
            ck.notes.append(
                "pickled objects replaced by placeholders (not needed for the weights): "
                + ", ".join(full["__placeholders__"])
            )
    return ck


# ============================================================================ the training recipe
# The released `.ckpt` files pickle their run config (an omegaconf DictConfig) under
# `hyper_parameters`, with the names of an earlier version of the code. They are read as
# plain data (the pickled objects are inert placeholders, see `_torch_load`) and reported in
# today's terms; a recipe that contradicts the tensors, or conditions on another time, is refused.
LEGACY_ALGORITHMS = {"dos_denoiser": "FLM"}  # algo.name → stage 1, the flow (denoiser) model
LOSS_TYPES = {"sd": "psd", "psd": "psd", "lsd": "lsd", "esd": "esd"}  # training.loss_type → method
TAU_TIME_CONDITIONS = ("alpha_t", "alpha", "tau")  # the network sees τ ("alpha" in the reference)


def plain_data(obj, depth: int = 0):
    """Nested dicts/lists/scalars from pickled objects: placeholders of omegaconf containers
    (their state's `_content`) and value nodes (`_val`) are unwrapped; anything else opaque
    becomes its repr."""
    if depth > 64:
        return "<too deep>"
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): plain_data(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_data(v, depth + 1) for v in obj]
    state = getattr(obj, "state", None)
    if isinstance(state, dict):
        if "_content" in state:
            return plain_data(state["_content"], depth + 1)
        if "_val" in state:
            return plain_data(state["_val"], depth + 1)
        return plain_data({k: v for k, v in state.items() if not k.startswith("_")}, depth + 1)
    return repr(obj)


def _find(tree, dotted: str):
    """The value at `a.b.c` in nested dicts, searched at the top and under any one key
    (Lightning stores the run config as hyper_parameters['config'])."""
    def get(node, keys):
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    keys = dotted.split(".")
    found = get(tree, keys)
    if found is None and isinstance(tree, dict):
        for value in tree.values():
            found = get(value, keys)
            if found is not None:
                break
    return found


def training_recipe(hyper_parameters: dict | None, two_time: bool, source: str) -> dict | None:
    """{'stage': 'FLM' | 'FMLM-PSD' | ..., 'method', 'names': the legacy fields read} from a
    checkpoint's `hyper_parameters`, or None when it names none of them. ValueError when the
    recipe contradicts the tensors (an FMLM recipe without sigma_map_prime, or the reverse)
    or when the network was conditioned on a time other than τ."""
    if not hyper_parameters:
        return None
    names = {key: _find(hyper_parameters, key) for key in ("algo.name", "training.loss_type")}
    condition = _find(hyper_parameters, "time_condition")
    if condition is None:
        condition = _find(hyper_parameters, "algo.time_condition")
    names["time_condition"] = condition
    names = {k: v for k, v in names.items() if v is not None}
    if not names:
        return None
    if condition is not None and condition not in TAU_TIME_CONDITIONS:
        raise ValueError(f"{source}: hyper_parameters say time_condition={condition!r}, but fmlm-jax "
                         f"feeds the network τ (the reference's {TAU_TIME_CONDITIONS[0]!r}); this "
                         "checkpoint was conditioned on another time and would sample wrongly")
    method = LOSS_TYPES.get(str(names.get("training.loss_type", "")).lower())
    algorithm = names.get("algo.name")
    if method is not None:
        stage = f"FMLM-{method.upper()}"
    elif algorithm is not None and algorithm not in LEGACY_ALGORITHMS:
        raise ValueError(f"{source}: hyper_parameters name algo.name={algorithm!r}, which is not an "
                         f"FLM/FMLM algorithm this converter knows ({sorted(LEGACY_ALGORITHMS)} or a "
                         f"training.loss_type in {sorted(LOSS_TYPES)})")
    else:
        stage = "FLM"
    if stage.startswith("FMLM") != bool(two_time):
        layout = "two-time (sigma_map_prime)" if two_time else "one-time (no sigma_map_prime)"
        raise ValueError(f"{source}: hyper_parameters describe an {stage} run ("
                         + ", ".join(f"{k}={v}" for k, v in names.items())
                         + f") but its tensors are {layout}; the file is inconsistent")
    return {"stage": stage, "method": method, "names": names}


def describe_recipe(recipe: dict | None) -> str:
    if recipe is None:
        return "no training recipe in the file"
    legacy = ", ".join(f"{k}={v}" for k, v in recipe["names"].items())
    return f"{recipe['stage']} (from {legacy})"


# ============================================================================ the model config


def inferred_fields(ck: TorchCheckpoint) -> dict:
    """Every model-config field the tensors determine (n_heads only via the rotary buffer)."""
    t = ck.tensors
    emb = t["vocab_embed.embedding"]
    if emb.ndim != 2:
        raise ValueError(
            f"{ck.source}: vocab_embed.embedding has shape {emb.shape}, expected (K, d)"
        )
    vocab, hidden = (int(n) for n in emb.shape)
    sm = t["sigma_map.mlp.0.weight"]
    if sm.ndim != 2 or sm.shape[1] != TIME_FEATURES:
        raise ValueError(
            f"{ck.source}: sigma_map.mlp.0.weight has shape {sm.shape}, expected "
            f"(cond_dim, {TIME_FEATURES}) (SPEC §3.2)"
        )
    block_ids = sorted({int(m.group(1)) for k in t if (m := re.match(r"blocks\.(\d+)\.", k))})
    if block_ids != list(range(len(block_ids))) or not block_ids:
        raise ValueError(f"{ck.source}: transformer blocks {block_ids} are not 0..n-1")
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        cond_dim=int(sm.shape[0]),
        n_blocks=len(block_ids),
        two_time=any(k.startswith("sigma_map_prime.") for k in t),
        learnable_loss_weighting=any(k.startswith("learnable_loss_weighting.") for k in t),
    )
    mlp = t.get("blocks.0.mlp.0.weight")
    if mlp is not None and mlp.ndim == 2 and mlp.shape[0] % hidden == 0:
        fields["mlp_ratio"] = int(mlp.shape[0] // hidden)
    if ck.inv_freq is not None:
        fields["n_heads"] = _heads_from_rotary(ck.inv_freq, hidden, ck.source)
    return fields


def _heads_from_rotary(inv_freq: np.ndarray, hidden: int, source: str) -> int:
    head_dim = 2 * int(inv_freq.size)
    if inv_freq.ndim != 1 or head_dim == 0 or hidden % head_dim:
        raise ValueError(
            f"{source}: rotary_emb.inv_freq has shape {inv_freq.shape}, which gives no head "
            f"dimension dividing the width {hidden}"
        )
    if not np.allclose(inv_freq, rotary_inv_freq(head_dim), rtol=1e-5, atol=0):
        raise ValueError(
            f"{source}: rotary_emb.inv_freq is not 10000^(-2j/{head_dim}); this model's "
            "rotary base differs from the reference (SPEC §3.3)"
        )
    return hidden // head_dim


def _check_vocab(vocab: int, expected: int | None, source: str) -> None:
    if expected is None or int(expected) == vocab:
        return
    found = f" ({KNOWN_VOCABS[vocab]})" if vocab in KNOWN_VOCABS else ""
    wanted = f" ({KNOWN_VOCABS[int(expected)]})" if int(expected) in KNOWN_VOCABS else ""
    raise ValueError(
        f"{source} has vocabulary size {vocab}{found} but {expected}{wanted} was expected; "
        "the tokenizer sizes are 30522 = bert-base-uncased (LM1B) and 50258 = gpt2 + [PAD] "
        "(OpenWebText): use the checkpoint that matches your tokenizer, or the tokenizer "
        "that matches the checkpoint"
    )


def checkpoint_config(ck: TorchCheckpoint, config=None, n_heads: int | None = None,
                      expected_vocab_size: int | None = None) -> ml_collections.ConfigDict:
    """The model config of `ck`: inferred from its tensors, or `config` checked against them.

    n_heads cannot be read from weight shapes; it comes from `config`, from `n_heads`, or
    from the rotary buffer of a `.ckpt` (head_dim = 2·len(inv_freq)), and all that are
    given must agree.
    """
    found = inferred_fields(ck)
    _check_vocab(found["vocab_size"], expected_vocab_size, ck.source)
    if n_heads is not None and "n_heads" in found and int(n_heads) != found["n_heads"]:
        raise ValueError(
            f"n_heads={n_heads} was given but {ck.source}'s rotary buffer has "
            f"{ck.inv_freq.size} frequencies, i.e. head_dim {2 * ck.inv_freq.size} and "
            f"{found['n_heads']} heads at width {found['hidden_size']}"
        )
    if config is not None:
        cfg = model_lib.resolve_config(config)
        if n_heads is not None and int(n_heads) != cfg.n_heads:
            raise ValueError(
                f"n_heads={n_heads} contradicts the given config's n_heads={cfg.n_heads}"
            )
        wrong = [
            f"{key}: config {cfg[key]!r}, checkpoint {value!r}{_explain(key, value)}"
            for key, value in found.items() if cfg[key] != value
        ]
        if wrong:
            raise ValueError(
                f"{ck.source} is a {_layout_words(found)} whose tensors do not fit the given "
                f"model config: " + "; ".join(wrong)
            )
        return cfg
    if n_heads is None and "n_heads" not in found:
        raise ValueError(
            f"n_heads cannot be inferred from the weights of {ck.source} (no rotary buffer); "
            + N_HEADS_HINT
        )
    found.setdefault("n_heads", None if n_heads is None else int(n_heads))
    vocab = found.pop("vocab_size")
    cfg = model_lib.model_config("small", vocab, **found)
    return model_lib.resolve_config(cfg)



def _explain(key: str, value) -> str:
    if key == "two_time":
        return (" (it has sigma_map_prime: a two-time FMLM)" if value
                else " (no sigma_map_prime: a one-time FLM)")
    if key == "learnable_loss_weighting":
        return (" (it has learnable_loss_weighting.*)" if value
                else " (no learnable_loss_weighting.*)")
    if key == "vocab_size" and value in KNOWN_VOCABS:
        return f" ({KNOWN_VOCABS[value]})"
    return ""


def _layout_words(fields: dict) -> str:
    kind = "two-time FMLM" if fields["two_time"] else "one-time FLM"
    if fields["learnable_loss_weighting"]:
        kind += " with learnable loss weighting"
    return kind


# ============================================================================ torch → params


def _ema_state_dict(ck: TorchCheckpoint, cfg) -> collections.OrderedDict:
    """Names the EMA list by the table; refuses a list that does not fit the layout."""
    table = reference_names(cfg)
    if ck.ema is None:
        raise ValueError(
            f"{ck.source} has no EMA weights (no `ema.shadow_params`); "
            "convert its raw weights with --weights raw (weights='raw')"
        )
    if len(ck.ema) != len(table):
        raise ValueError(
            f"{ck.source}: the EMA list has {len(ck.ema)} tensors but the {describe_layout(cfg)} "
            f"of its state_dict has {len(table)} parameters. The reference loader would "
            "silently truncate the list (zip) and give tensors to the wrong parameters; we "
            "refuse. The EMA belongs to another architecture or the file is damaged: "
            "convert the raw weights with --weights raw (weights='raw')"
        )
    named = collections.OrderedDict()
    for i, ((name, _, _), value) in enumerate(zip(table, ck.ema, strict=True)):
        want = ck.tensors[name].shape if name in ck.tensors else None
        if want is not None and value.shape != want:
            raise ValueError(
                f"{ck.source}: EMA entry {i} has shape {tuple(value.shape)} but parameter {i} "
                f"({name}) has {tuple(want)}; the EMA list is not in the reference parameter "
                "order (SPEC §7). Convert the raw weights with --weights raw (weights='raw')"
            )
        named[name] = value
    return named


def check_weights(weights: str) -> str:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    return weights


def weight_sets(ck: TorchCheckpoint, cfg, weights: str) -> dict:
    """{'raw': params, 'ema': params} as stored for `weights` (see `torch_to_orbax`)."""
    check_weights(weights)
    if ck.format == "safetensors":
        # One set of tensors; `weights` says which it is (our files record it).
        if ck.weights_label is not None and ck.weights_label != weights:
            raise ValueError(
                f"{ck.source} holds {ck.weights_label} weights (its metadata says so); "
                f"pass --weights {ck.weights_label} (weights={ck.weights_label!r})"
            )
        return {weights: params_from_state_dict(ck.tensors, cfg)}
    if weights == "raw":
        return {"raw": params_from_state_dict(ck.tensors, cfg)}
    ema = _ema_state_dict(ck, cfg)  # fails first when there is no EMA: nothing else to do
    return {"raw": params_from_state_dict(ck.tensors, cfg), "ema": params_from_state_dict(ema, cfg)}


def load_torch(src, config=None, weights: str = "ema", n_heads: int | None = None,
               expected_vocab_size: int | None = None) -> tuple[dict, Any]:
    """(params for `fmlm_jax.model.DiT`, model config) from a reference checkpoint.

    src: a `.ckpt` / `.safetensors` path, a checkpoint dict or a state dict (see
    `read_torch_checkpoint`). config: a model config to check the tensors against
    (None: inferred). weights: 'ema' (the EMA `shadow_params`, matched to the reference
    parameter order) or 'raw' (the state_dict); a safetensors file holds one set, which
    `weights` names. n_heads: required unless `config` is given or the file has the
    rotary buffer (published models: 12). expected_vocab_size: checked when given.
    Params are float32 numpy arrays.
    """
    ck = read_torch_checkpoint(src)
    cfg = checkpoint_config(ck, config, n_heads, expected_vocab_size)
    check_weights(weights)
    if ck.format == "safetensors":
        return weight_sets(ck, cfg, weights)[weights], cfg
    if weights == "ema":
        return params_from_state_dict(_ema_state_dict(ck, cfg), cfg), cfg
    return params_from_state_dict(ck.tensors, cfg), cfg


def params_from_torch(state_dict_or_path, config=None, weights: str = "ema",
                      n_heads: int | None = None, expected_vocab_size: int | None = None) -> dict:
    """Params only; `load_torch` also returns the (inferred) model config."""
    return load_torch(state_dict_or_path, config, weights, n_heads, expected_vocab_size)[0]


def params_to_torch(
    params: Mapping, config, include_buffers: bool = False
) -> collections.OrderedDict:
    """Reference-named torch tensors (no `backbone.`) in reference order, float32 as stored.

    include_buffers: also insert `rotary_emb.inv_freq` where the reference state_dict has
    it (after the time embedders), so `load_state_dict(strict=True)` accepts the result.
    """
    torch = _require_torch("params_to_torch")
    arrays = _torch_arrays(params, config, include_buffers)
    return collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in arrays.items())


def _torch_arrays(params: Mapping, config, include_buffers: bool) -> collections.OrderedDict:
    cfg = model_lib.resolve_config(config)
    model_lib.check_params(params, cfg, "params")
    arrays = state_dict_from_params(model_lib.to_host(params), cfg)
    if not include_buffers:
        return arrays
    out = collections.OrderedDict()
    inserted = False
    for name, value in arrays.items():
        if not inserted and not name.startswith(("vocab_embed.", "sigma_map.", "sigma_map_prime.")):
            out[ROTARY_BUFFER] = rotary_inv_freq(cfg.hidden_size // cfg.n_heads)
            inserted = True
        out[name] = value
    return out


# ============================================================================ writing torch


def save_torch_checkpoint(path, params_raw: Mapping, params_ema: Mapping | None, config,
                          step: int = 0, epoch: int = 0, ema_decay: float | None = None,
                          ema_num_updates: int | None = None, overwrite: bool = False) -> str:
    """Writes a `.ckpt` in the released layout; returns its path.

    `state_dict`: `backbone.<name>` for every parameter plus the `rotary_emb.inv_freq`
    buffer, in the reference order; `ema` (when `params_ema` is given): {decay,
    num_updates, shadow_params: the EMA tensors in reference parameter order};
    `global_step`, `epoch`; plus what Lightning's `load_from_checkpoint` and the authors'
    `on_load_checkpoint` read (`pytorch-lightning_version`, the `loops` counters, zero).
    """
    torch = _require_torch("writing a .ckpt")
    cfg = model_lib.resolve_config(config)
    raw = _torch_arrays(params_raw, cfg, include_buffers=True)
    ckpt: dict = {
        "state_dict": collections.OrderedDict(
            (f"backbone.{k}", torch.from_numpy(np.ascontiguousarray(v))) for k, v in raw.items()
        ),
    }
    if params_ema is not None:
        ema = _torch_arrays(params_ema, cfg, include_buffers=False)
        ckpt["ema"] = {  # the key order of the reference's ExponentialMovingAverage.state_dict
            "shadow_params": [torch.from_numpy(np.ascontiguousarray(v)) for v in ema.values()],
            "num_updates": int(step if ema_num_updates is None else ema_num_updates),
            "decay": float(DEFAULT_EMA_DECAY if ema_decay is None else ema_decay),
        }
    ckpt.update({
        "global_step": int(step),
        "epoch": int(epoch),
        "pytorch-lightning_version": LIGHTNING_VERSION,
        # The authors' on_load_checkpoint reads these data-loader positions; positions
        # of their pipeline mean nothing for converted weights, so they start at zero.
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}},
                               "epoch_loop.batch_progress": {"current": {"completed": 0}}}},
    })
    with atomic.atomic_output(path, overwrite) as tmp:
        torch.save(ckpt, tmp)
    return os.path.abspath(os.fspath(path))


def save_safetensors(path, params: Mapping, config, weights: str = "ema", step: int = 0,
                     overwrite: bool = False) -> str:
    """Writes HF-style safetensors: float32, reference names without `backbone.`, plus the
    rotary buffer; the metadata records which weights these are and the model config."""
    from safetensors.numpy import save_file

    cfg = model_lib.resolve_config(config)
    arrays = _torch_arrays(params, cfg, include_buffers=True)
    metadata = {
        "format": "pt",
        "producer": PRODUCER,
        "weights": check_weights(weights),
        "global_step": str(int(step)),
        "model_config": json.dumps(model_lib.config_json(cfg), sort_keys=True),
    }
    with atomic.atomic_output(path, overwrite) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata=metadata)
    return os.path.abspath(os.fspath(path))


# ============================================================================ Orbax


