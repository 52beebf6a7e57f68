"""Orbax checkpoints: run checkpoints, params-only exports, and one `load(path)` for all of them.

    manager = open_manager(workdir, max_to_keep=3, keep_period=10_000)
    state, step = restore_latest(manager, state, data_iterator=it, config=config) or (state, 0)
    save(manager, step, state, data_iterator=it, config=config)           # every save_every steps
    export_params(out_dir, params_raw, params_ema, model_config, step)   # weights only
    params, model_config, run_config = load(path, weights="ema")         # teachers, evaluation, demo

One layout family: a directory of Orbax steps, ROOT/<step>/{..., meta}, whose `meta` item
(JSON) says what the step holds:
  run     {state, data, meta}  the whole TrainState (`StandardSave`), the grain iterator's
          position, and meta {format RUN_FORMAT, step, model_fingerprint, model_config,
          config (the whole run config), seed, rng, teacher (path + fingerprint)};
  export  {params, meta}       {'raw', 'ema'} parameter sets (converted reference weights, or
          exported from a run) and meta {format EXPORT_FORMAT, model_config, step, weights,
          ema, source, recipe, num_params}.
`load` also takes a reference `.ckpt` / `.safetensors` file (converted in memory). A path is
a root (its latest step) or one step directory (`locate`).

Writes are atomic: Orbax writes a step under `<step>.orbax-checkpoint-tmp-*` and renames it
when complete, so an interrupted save is never listed; exports are renamed into place whole.
A step damaged afterwards (a truncated array file, garbage in `meta`, a deleted item) does not
block a run: `restore_latest` and `load` warn, name it, and use the newest step that restores
(every item read in full); a resumed run moves the damaged steps aside as
`<step>.corrupt-<UTC time>` (never deleted; Orbax no longer lists them).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fmlm_jax import atomic, errors
from fmlm_jax import config as fmlm_config
from fmlm_jax import model as model_lib
from fmlm_jax.convert import names, torch_io

RUN_FORMAT = "fmlm_jax.checkpoints/1"
EXPORT_FORMAT = "fmlm_jax.convert/1"  # the name predates this module: kept so old exports load
WEIGHTS = ("ema", "raw")
DEFAULT_EMA_DECAY = 0.9999  # the reference recipe's EMA decay (SPEC §4)
# Resolved model-config fields that do not change the function a set of parameters
# computes (regularisation, compute precision, how attention is computed): left out of the
# fingerprint, so a run may resume or a teacher be loaded with another dropout rate, compute
# dtype or attention kernel.
NON_ARCHITECTURE_FIELDS = ("dropout", "dtype", "attention_impl")


# ============================================================================ fingerprint


def _json_value(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


def architecture(model_config) -> dict:
    """The resolved model-config fields that define the architecture (see `model_fingerprint`)."""
    cfg = model_lib.resolve_config(ml_collections.ConfigDict(dict(model_config)))
    return {k: _json_value(v) for k, v in sorted(cfg.to_dict().items())
            if k not in NON_ARCHITECTURE_FIELDS}


def model_fingerprint(model_config) -> str:
    """A stable hash (16 hex digits) of the architecture: every resolved model-config field
    but `NON_ARCHITECTURE_FIELDS`. Omitted optional fields hash as their defaults."""
    blob = json.dumps(architecture(model_config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _config_json(config) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=repr))


def run_metadata(config, **extra) -> dict:
    """The `meta` item of a run step (needs `config.model`; `config.seed` if present)."""
    meta = {
        "format": RUN_FORMAT,
        "model_fingerprint": model_fingerprint(config.model),
        "model_config": architecture(config.model) | {
            k: _json_value(config.model[k]) for k in NON_ARCHITECTURE_FIELDS if k in config.model},
        "config": _config_json(config),
        "seed": _json_value(config.get("seed")) if hasattr(config, "get") else None,
    }
    meta.update(extra)
    return meta


def check_compatible(meta: dict, model_config, where: str = "the checkpoint") -> None:
    """ValueError naming the differing fields unless `meta` was saved for this architecture."""
    saved_fingerprint = meta.get("model_fingerprint") or model_fingerprint(meta["model_config"])
    if saved_fingerprint == model_fingerprint(model_config):
        return
    saved = {k: v for k, v in (meta.get("model_config") or {}).items()
             if k not in NON_ARCHITECTURE_FIELDS}
    try:
        saved = architecture(saved)
    except (ValueError, KeyError):
        pass
    current = architecture(model_config)
    diffs = [f"{k}: saved {saved.get(k)!r}, config {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    raise ValueError(
        f"{where} was written for another model (fingerprint {meta.get('model_fingerprint')}, "
        f"this config's is {model_fingerprint(model_config)}); differing fields: "
        + ("; ".join(diffs) or "none listed (fingerprint scheme changed?)")
        + ". Use a fresh --workdir for a new model, or the run's own config to resume it."
    )


def run_mode(meta: dict) -> str | None:
    """The mode ('flm' / 'fmlm') of a run step's meta; older checkpoints say 'train' / 'distill'."""
    mode = (meta.get("config") or {}).get("mode")
    return fmlm_config.LEGACY_MODES.get(mode, mode)


# ============================================================================ damaged steps
# What reading a damaged step raises: a missing file (OSError), garbage in a JSON item
# (UnicodeDecodeError, JSONDecodeError), a deleted item (KeyError), a deleted _METADATA (a
# tree mismatch, ValueError), and a truncated array file: Orbax wraps TensorStore's error in
# a bare Exception. So any Exception counts; a step is only moved aside when an older one
# restores, so a bug that breaks every restore moves nothing.
DAMAGE = (Exception,)
REASON_CHARS = 240  # tensorstore's errors quote whole specs: the start names file and fault


class DamagedStep(Exception):
    """A step some item of which cannot be read (`reason` says which and why)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"step {step}: {reason}")
        self.step, self.reason = step, reason


def _reason(item: str, error: BaseException) -> str:
    while type(error) is Exception and error.__cause__ is not None:  # Orbax wraps; the cause names the file
        error = error.__cause__
    text = errors.message(error)
    if item == "data" and isinstance(error, KeyError) and "not found" in text:
        text = "it holds no data-iterator state (saved without data_iterator)"
    text = f"{item}: {text}"
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 1] + "…"


def _read(step: int, item: str, read: Callable[[], Any]) -> Any:
    """read(), with any damage raised as DamagedStep naming the item."""
    try:
        return read()
    except DAMAGE as error:
        raise DamagedStep(step, _reason(item, error)) from error


def _newest_that_restores(where: str, steps, restore: Callable[[int], Any]) -> tuple[Any, int, list]:
    """(restore(step), step, [DamagedStep of every newer step]) for the newest step of `steps`
    that restores. None restores: UnreadableCheckpointError naming each step and its fault."""
    damaged = []
    for step in sorted(steps, reverse=True):
        try:
            return restore(step), step, damaged
        except DamagedStep as fault:
            damaged.append(fault)
    raise errors.UnreadableCheckpointError(
        f"no checkpoint step in {where} can be restored: " + "; ".join(map(str, damaged))
        + ". Nothing was moved: restore the steps from a backup, move them away, or start a fresh --workdir")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def step_path(manager: ocp.CheckpointManager, step: int):
    """The directory of a finalized step (an etils.epath.Path: local or gs://)."""
    return ocp.step.find_step_path(manager.directory, ocp.step.standard_name_format(), step=step)


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Renames step `step` to `<step>.corrupt-<UTC time>`, e.g. `6.corrupt-20261203T122133Z`
    (which Orbax does not list, nor clean up); returns the new path. Nothing is deleted: the
    files stay for a post-mortem."""
    path = step_path(manager, step)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = path.parent / f"{path.name}.corrupt-{stamp}", 1
    while target.exists():  # the same step damaged again within the second
        n += 1
        target = path.parent / f"{path.name}.corrupt-{stamp}-{n}"
    path.rename(target)
    manager.reload()
    return os.fspath(target)


# ============================================================================ the manager


def _item_handlers() -> dict:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "params": ocp.PyTreeCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _root(workdir) -> str:
    workdir = os.fspath(workdir)
    return workdir if "://" in workdir else os.path.abspath(workdir)  # gs://... stays a URL


def open_manager(workdir: str | os.PathLike, max_to_keep: int | None = 3,
                 keep_period: int | None = None, *, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over WORKDIR (created unless read_only).

    max_to_keep: the last N steps are kept (None: all); keep_period: steps divisible by it
    are kept too. async_save: `save` returns once the arrays are on the host and writes in
    the background (the next jitted step may then donate the state); `close()` waits.
    Leftover `*.orbax-checkpoint-tmp-*` directories of interrupted saves are removed.
    read_only: for reading an existing directory (nothing created or cleaned up; Orbax's own
    read_only flag is not used because it logs a warning per call).
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period, create=not read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save and not read_only,
    )
    return ocp.CheckpointManager(_root(workdir), options=options, item_handlers=_item_handlers())


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None,
         metadata: dict | None = None, *, config=None, force: bool = True) -> bool:
    """Saves `state` (the whole TrainState), the iterator's position and `meta` as step `step`.

    config: the run config; fills `meta` (fingerprint, model config, config, seed).
    metadata: further JSON fields for `meta` (without `config`, it must hold at least
    `model_config`). Returns whether a save was started.
    """
    meta = run_metadata(config) if config is not None else {"format": RUN_FORMAT}
    meta.update(metadata or {})
    if "model_config" not in meta:
        raise ValueError("save needs config= (the run config) or metadata with a 'model_config'")
    meta.setdefault("model_fingerprint", model_fingerprint(meta["model_config"]))
    meta["step"] = int(step)
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(int(step), args=ocp.args.Composite(**items), force=force)


def read_metadata(manager: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The `meta` item of `step` (default: the latest); None when there is no step."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def newest_metadata(manager: ocp.CheckpointManager) -> dict | None:
    """The `meta` of the newest step whose meta reads (None: no such step). For checks made
    before a restore (is it this run's workdir?); `restore_latest` reports damaged steps."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = read_metadata(manager, step)
        except DAMAGE:
            continue
        if isinstance(meta, dict):
            return meta
    return None


def _abstract(x):
    """jax Arrays → structs keeping their sharding; numpy leaves stay (restored as numpy)."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def restore_latest(manager: ocp.CheckpointManager, state_template, data_iterator=None,
                   config=None, *, move_damaged: bool = True,
                   warn: Callable[[str], None] = _warn) -> tuple[Any, int] | None:
    """(state, step) of the newest step that restores, or None when there is none (fresh start).

    state_template: a TrainState giving the structure, dtypes and placement: jax Array
    leaves (or jax.ShapeDtypeStruct with a sharding) restore as jax Arrays with that
    sharding, numpy leaves as numpy arrays.
    data_iterator: restored in place to the saved position (each step must hold one).
    config: the run config; a step saved for another architecture raises ValueError.
    A newer step that does not restore (any of meta, state, data) is named in a warning and,
    with move_damaged (by the first process only), moved aside (`move_aside`);
    when no step restores, UnreadableCheckpointError names them all and nothing is moved.
    """
    manager.wait_until_finished()
    manager.reload()
    steps = manager.all_steps()
    if not steps:
        return None
    target = jax.tree_util.tree_map(_abstract, state_template)

    def restore(step: int):
        meta = _read(step, "meta", lambda: read_metadata(manager, step))
        if not isinstance(meta, dict) or "model_config" not in meta:
            raise DamagedStep(step, "meta: not a run step's metadata (no model_config)")
        if config is not None:  # a refusal, not damage: it must not fall back to an older step
            check_compatible(meta, config.model, f"{manager.directory} (step {step})")
        state = _read(step, "state", lambda: manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"])
        if data_iterator is not None:  # last: a failed read leaves the iterator as it was
            _read(step, "data", lambda: manager.restore(step, args=ocp.args.Composite(
                data=grain.checkpoint.CheckpointRestore(data_iterator))))
        return state

    state, step, damaged = _newest_that_restores(os.fspath(manager.directory), steps, restore)
    for fault in damaged:
        path = os.fspath(step_path(manager, fault.step))
        moved = (f"moved it to {move_aside(manager, fault.step)}" if move_damaged and jax.process_index() == 0
                 else "left it in place")
        warn(f"checkpoint {path} cannot be restored ({fault.reason}); {moved}; resuming from step {step}")
    return state, int(step)


# ============================================================================ exports


def export_params(out_dir, params_raw=None, params_ema=None, model_config=None, step: int = 0, *,
                  source: str | None = None, epoch: int = 0, ema_decay: float | None = None,
                  ema_num_updates: int | None = None, overwrite: bool = False,
                  recipe: dict | None = None) -> str:
    """Writes OUT_DIR/<step>/{params, meta}, atomically: the 'raw' and/or 'ema' parameter sets
    (host arrays) and their meta, so that `load(out_dir)` needs no flags. Returns the step dir."""
    cfg = model_lib.resolve_config(model_config)
    sets = {name: p for name, p in (("raw", params_raw), ("ema", params_ema)) if p is not None}
    if not sets:
        raise ValueError("export_params needs params_raw, params_ema or both")
    for name, params in sets.items():
        model_lib.check_params(params, cfg, f"params_{name}")
    sets = {name: model_lib.to_host(params) for name, params in sets.items()}
    meta = {
        "format": EXPORT_FORMAT,
        "model_config": model_lib.config_json(cfg),
        "layout": names.describe_layout(cfg),
        "step": int(step),
        "epoch": int(epoch),
        "weights": sorted(sets),
        "ema": None if "ema" not in sets else {
            "decay": float(DEFAULT_EMA_DECAY if ema_decay is None else ema_decay),
            "num_updates": int(step if ema_num_updates is None else ema_num_updates),
        },
        "source": source,
        "recipe": recipe,
        "num_params": model_lib.count_params(next(iter(sets.values()))),
    }
    with atomic.atomic_output(out_dir, overwrite) as tmp:
        with open_manager(tmp, max_to_keep=None, async_save=False) as manager:
            manager.save(int(step), args=ocp.args.Composite(
                params=ocp.args.PyTreeSave(sets), meta=ocp.args.JsonSave(meta)))
            manager.wait_until_finished()
    return os.path.join(os.path.abspath(os.fspath(out_dir)), str(int(step)))


# ============================================================================ load(path)


def locate(path) -> tuple[str, int | None]:
    """(root, step or None) of a checkpoint directory: a root (latest step) or a step directory."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: pass a training workdir (or one of its step "
                                "directories), an export directory or a reference .ckpt / .safetensors file")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file, not an Orbax checkpoint directory")
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "meta")):
        return os.path.dirname(path), int(base)
    return path, None


def _step_meta(manager: ocp.CheckpointManager, root: str, step: int) -> dict:
    meta = _read(step, "meta", lambda: read_metadata(manager, step))
    if not isinstance(meta, dict) or meta.get("format") not in (RUN_FORMAT, EXPORT_FORMAT):
        raise DamagedStep(step, "meta: not an fmlm-jax checkpoint's (no known format)")
    return meta


def _steps(root: str, step: int | None) -> list[int]:
    """The steps to try, newest first: all of ROOT's, or the one asked for."""
    with open_manager(root, read_only=True) as manager:
        steps = manager.all_steps()
    if not steps:
        raise ValueError(f"{root} holds no checkpoint steps (no <step>/meta): not a training workdir, "
                         "an export or a converted checkpoint")
    if step is not None and step not in steps:
        raise ValueError(f"{root} has no step {step}; it has {sorted(steps)}")
    return sorted(steps) if step is None else [step]


def _report(root: str, damaged: list, step: int, warn: Callable[[str], None]) -> None:
    for fault in damaged:  # someone else's workdir (a teacher, a run still training): left in place
        warn(f"checkpoint {os.path.join(root, str(fault.step))} cannot be restored ({fault.reason}); "
             f"using step {step} instead")


def read_meta(path, step: int | None = None, warn: Callable[[str], None] = _warn) -> tuple[dict, int]:
    """(meta, step) of a checkpoint directory's step (`locate`): the one given, else the newest
    whose meta reads (a damaged newer one is named in a warning)."""
    root, found = locate(path)
    step = found if step is None else int(step)
    with open_manager(root, read_only=True) as manager:
        meta, step, damaged = _newest_that_restores(
            root, _steps(root, step), lambda s: _step_meta(manager, root, s))
    _report(root, damaged, step, warn)
    return meta, step


def _restore_params(root: str, step: int, item: str, key: str, cfg) -> dict:
    """One parameter set, `<item>[key]`, of a step as host numpy arrays (Orbax partial restore)."""
    dtype = np.dtype(cfg.param_dtype)
    target = {key: jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype),
                                          model_lib.param_shapes(cfg))}
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    handlers = {item: ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    with ocp.CheckpointManager(root, options=options, item_handlers=handlers) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)}))
    return restored[item][key]


class Loaded(NamedTuple):
    params: dict  # host numpy arrays
    model_config: Any  # resolved
    run_config: dict | None  # a training run's config, else None
    meta: dict | None  # the step's meta (None for a reference file)
    step: int | None  # the step read (None for a reference file)


def load_checkpoint(path, weights: str = "ema", n_heads: int | None = None,
                    warn: Callable[[str], None] = _warn, attention_impl: str = "xla") -> Loaded:
    """`load`, with the step read and its meta. A root's newest step that does not restore is
    named in a warning and the next older one is read; a step directory is read or refused.
    The model config's attention_impl is `attention_impl` whatever the run used ('xla', which
    runs everywhere, unless asked): a GPU/TPU kernel saved with the run is no part of the
    architecture and need not exist where the checkpoint is read."""
    loaded = _load_checkpoint(path, weights, n_heads, warn)
    cfg = ml_collections.ConfigDict(dict(loaded.model_config.items()))
    cfg.attention_impl = attention_impl
    return loaded._replace(model_config=model_lib.resolve_config(cfg))  # refuses an unknown one


def _load_checkpoint(path, weights: str, n_heads: int | None, warn: Callable[[str], None]) -> Loaded:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    if os.path.isfile(os.fspath(path)):
        if not os.fspath(path).endswith((".ckpt", ".safetensors", ".pt", ".pth")):
            raise ValueError(f"{path} is a file but not a reference checkpoint (.ckpt / .safetensors); "
                             "pass a training workdir, an export directory or a reference checkpoint")
        params, cfg = torch_io.load_torch(path, weights=weights, n_heads=n_heads)
        return Loaded(params, cfg, None, None, None)
    root, found = locate(path)

    def restore(step: int) -> Loaded:
        with open_manager(root, read_only=True) as manager:
            meta = _step_meta(manager, root, step)
        cfg = _read(step, "meta", lambda: model_lib.resolve_config(
            ml_collections.ConfigDict(meta["model_config"])))
        if meta["format"] == RUN_FORMAT:
            key = "ema_params" if weights == "ema" else "params"
            params = _read(step, "state", lambda: _restore_params(root, step, "state", key, cfg))
            return Loaded(params, cfg, meta.get("config"), meta, step)
        if weights not in meta["weights"]:  # a refusal, not damage
            other = [w for w in meta["weights"] if w != weights]
            raise ValueError(f"{path} holds no {weights} weights (it has {meta['weights']}); "
                             f"pass weights={other[0]!r} (--weights {other[0]})")
        params = _read(step, "params", lambda: _restore_params(root, step, "params", weights, cfg))
        return Loaded(params, cfg, None, meta, step)

    loaded, step, damaged = _newest_that_restores(root, _steps(root, found), restore)
    _report(root, damaged, step, warn)
    return loaded


def load(path, weights: str = "ema", n_heads: int | None = None, attention_impl: str = "xla"):
    """(params, resolved model config, run config dict or None) from any checkpoint path.

    path: a training workdir or one of its step directories (run config: the run's), an
    export or converted directory (run config None), or a reference `.ckpt` / `.safetensors`
    file (converted in memory; `n_heads` when its rotary buffer is absent). weights: 'ema'
    or 'raw'; only that set is read. Params are host numpy arrays. A damaged newest step is
    named in a warning and the newest step that restores is read (`load_checkpoint`).
    attention_impl: the loaded config's (default 'xla', whichever kernel the run trained with).
    """
    loaded = load_checkpoint(path, weights, n_heads, attention_impl=attention_impl)
    return loaded.params, loaded.model_config, loaded.run_config
