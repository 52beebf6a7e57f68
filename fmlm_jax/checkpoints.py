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
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fmlm_jax import atomic
from fmlm_jax import config as fmlm_config
from fmlm_jax import model as model_lib
from fmlm_jax.convert import names, torch_io

RUN_FORMAT = "fmlm_jax.checkpoints/1"
EXPORT_FORMAT = "fmlm_jax.convert/1"  # the name predates this module: kept so old exports load
WEIGHTS = ("ema", "raw")
DEFAULT_EMA_DECAY = 0.9999  # the reference recipe's EMA decay (SPEC §4)
# Resolved model-config fields that do not change the function a set of parameters
# computes (regularisation, compute precision): left out of the fingerprint, so a run may
# resume or a teacher be loaded with another dropout rate or compute dtype.
NON_ARCHITECTURE_FIELDS = ("dropout", "dtype")


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


def _abstract(x):
    """jax Arrays → structs keeping their sharding; numpy leaves stay (restored as numpy)."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def restore_latest(manager: ocp.CheckpointManager, state_template, data_iterator=None,
                   config=None) -> tuple[Any, int] | None:
    """(state, step) of the latest finalized step, or None when there is none (fresh start).

    state_template: a TrainState giving the structure, dtypes and placement: jax Array
    leaves (or jax.ShapeDtypeStruct with a sharding) restore as jax Arrays with that
    sharding, numpy leaves as numpy arrays.
    data_iterator: restored in place to the saved position (the step must hold one).
    config: the run config; a step saved for another architecture raises ValueError.
    """
    manager.wait_until_finished()
    manager.reload()
    step = manager.latest_step()
    if step is None:
        return None
    meta = read_metadata(manager, step)
    if config is not None:
        check_compatible(meta, config.model, f"{manager.directory} (step {step})")
    target = jax.tree_util.tree_map(_abstract, state_template)
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except KeyError as err:
        if data_iterator is None or '"data"' not in str(err):
            raise
        raise ValueError(
            f"{manager.directory} step {step} holds no data-iterator state (it was saved "
            "without data_iterator); restore with data_iterator=None and position the data "
            "yourself"
        ) from err
    return restored["state"], int(step)


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
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file, not an Orbax checkpoint directory")
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "meta")):
        return os.path.dirname(path), int(base)
    return path, None


def read_meta(path, step: int | None = None) -> tuple[dict, int]:
    """(meta, step) of a checkpoint directory's step (`locate`; latest unless given)."""
    root, found = locate(path)
    step = found if step is None else int(step)
    with open_manager(root, read_only=True) as manager:
        steps = manager.all_steps()
        if not steps:
            raise ValueError(f"{root} holds no checkpoint steps (no <step>/meta): not a training workdir, "
                             "an export or a converted checkpoint")
        step = manager.latest_step() if step is None else step
        if step not in steps:
            raise ValueError(f"{root} has no step {step}; it has {sorted(steps)}")
        meta = read_metadata(manager, step)
    if not isinstance(meta, dict) or meta.get("format") not in (RUN_FORMAT, EXPORT_FORMAT):
        raise ValueError(f"{root} step {step} is not an fmlm-jax checkpoint (its meta has no known format)")
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


def load(path, weights: str = "ema", n_heads: int | None = None):
    """(params, resolved model config, run config dict or None) from any checkpoint path.

    path: a training workdir or one of its step directories (run config: the run's), an
    export or converted directory (run config None), or a reference `.ckpt` / `.safetensors`
    file (converted in memory; `n_heads` when its rotary buffer is absent). weights: 'ema'
    or 'raw'; only that set is read. Params are host numpy arrays.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    if os.path.isfile(os.fspath(path)):
        if not os.fspath(path).endswith((".ckpt", ".safetensors", ".pt", ".pth")):
            raise ValueError(f"{path} is a file but not a reference checkpoint (.ckpt / .safetensors); "
                             "pass a training workdir, an export directory or a reference checkpoint")
        params, cfg = torch_io.load_torch(path, weights=weights, n_heads=n_heads)
        return params, cfg, None
    meta, step = read_meta(path)
    root, _ = locate(path)
    cfg = model_lib.resolve_config(ml_collections.ConfigDict(meta["model_config"]))
    if meta["format"] == RUN_FORMAT:
        params = _restore_params(root, step, "state", "ema_params" if weights == "ema" else "params", cfg)
        return params, cfg, meta.get("config")
    if weights not in meta["weights"]:
        other = [w for w in meta["weights"] if w != weights]
        raise ValueError(f"{path} holds no {weights} weights (it has {meta['weights']}); "
                         f"pass weights={other[0]!r} (--weights {other[0]})")
    return _restore_params(root, step, "params", weights, cfg), cfg, None
