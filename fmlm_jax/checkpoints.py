"""Training checkpoints: a thin layer over Orbax's `CheckpointManager` (STYLE: State and checkpoints).

    mngr = open_manager(workdir, max_to_keep=3, keep_period=10_000)
    restored = restore_latest(mngr, state, data_iterator=it, config=config)
    state, start = restored if restored is not None else (state, 0)   # None: a fresh start
    ...
    save(mngr, step, state, data_iterator=it, config=config)           # every save_every steps
    mngr.close()                                                        # waits for async writes

Layout: WORKDIR/<step>/{state, data, meta}, one Orbax step per save:
  state  the whole TrainState (step, params, EMA, optimizer state), `StandardSave`;
  data   the grain iterator's position (grain's own Orbax handler), when one is given;
  meta   JSON: format, step, model_fingerprint, model_config (resolved), config (the
         whole run config), seed, plus any caller fields (e.g. a teacher's path and hash).
The run's rng is not stored: it is `jax.random.key(config.seed)` and each step folds in
`state.step`, so the seed in `meta` plus the restored step reproduce it.

Writes are atomic by Orbax's design: a step is written under `<step>.orbax-checkpoint-tmp-*`
and renamed when complete (on GCS a `commit_success.txt` marks it), so an interrupted save
is never listed and the previous step is restored (tests/test_checkpoints.py checks this).
Retention: the last `max_to_keep` steps, plus every step divisible by `keep_period`.

`load_weights(path)` reads params (EMA or raw) from a training workdir written here or
from a converted-weights directory (`fmlm_jax.convert.save_orbax`), so a distillation
config can name its teacher by path; `model_fingerprint` is the hash to record beside it.
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

from fmlm_jax import model as model_lib

FORMAT = "fmlm_jax.checkpoints/1"  # recorded in every step's `meta` item
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
    """The `meta` item for a run config (needs `config.model`; `config.seed` if present)."""
    meta = {
        "format": FORMAT,
        "model_fingerprint": model_fingerprint(config.model),
        "model_config": architecture(config.model) | {
            k: _json_value(config.model[k]) for k in NON_ARCHITECTURE_FIELDS if k in config.model},
        "config": _config_json(config),
        "seed": _json_value(config.get("seed")) if hasattr(config, "get") else None,
    }
    meta.update(extra)
    return meta


# ============================================================================ manager


def _item_handlers() -> dict:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def open_manager(workdir: str | os.PathLike, max_to_keep: int | None = 3,
                 keep_period: int | None = None, *, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over WORKDIR (created unless read_only).

    max_to_keep: the last N steps are kept (None: all); keep_period: steps divisible by it
    are kept too. async_save: `save` returns once the arrays are on the host and writes in
    the background (the next jitted step may then donate the state); `close()` waits.
    Leftover `*.orbax-checkpoint-tmp-*` directories of interrupted saves are removed.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        keep_period=keep_period,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
    )
    workdir = os.fspath(workdir)
    root = workdir if "://" in workdir else os.path.abspath(workdir)  # gs://... stays a URL
    return ocp.CheckpointManager(root, options=options, item_handlers=_item_handlers())


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None,
         metadata: dict | None = None, *, config=None, force: bool = True) -> bool:
    """Saves `state` (the whole TrainState), the iterator's position and `meta` as step `step`.

    config: the run config; fills `meta` (fingerprint, model config, config, seed).
    metadata: further JSON fields for `meta` (without `config`, it must hold at least
    `model_config`). Returns whether a save was started.
    """
    meta = run_metadata(config) if config is not None else {"format": FORMAT}
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


def check_compatible(meta: dict, model_config, where: str = "the checkpoint") -> None:
    """ValueError naming the differing fields unless `meta` was saved for this architecture."""
    if meta.get("model_fingerprint") == model_fingerprint(model_config):
        return
    saved = meta.get("model_config") or {}
    saved = {k: v for k, v in saved.items() if k not in NON_ARCHITECTURE_FIELDS}
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


# ============================================================================ weights by path


def _workdir_step(path: str) -> tuple[str, int | None]:
    """(manager root, step or None) for a workdir or one of its step directories."""
    base = os.path.basename(os.path.normpath(path))
    if base.isdigit() and os.path.isdir(os.path.join(path, "meta")):
        return os.path.dirname(os.path.normpath(path)), int(base)
    return path, None


def load_weights(path: str | os.PathLike, weights: str = "ema") -> tuple[dict, ml_collections.ConfigDict]:
    """(params, resolved model config) from a training workdir written here (latest step,
    or the given step directory) or a converted-weights directory (`convert.save_orbax`).

    weights: 'ema' (the EMA parameters) or 'raw'. Params are host numpy arrays; only
    that set is read.
    """
    from fmlm_jax import convert

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    root, step = _workdir_step(path)
    meta = None
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    with ocp.CheckpointManager(root, options=options, item_handlers=handlers) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is not None:
            try:
                meta = read_metadata(mngr, step)
            except (FileNotFoundError, ValueError, KeyError):
                meta = None
        if isinstance(meta, dict) and meta.get("format") == FORMAT:
            cfg = model_lib.resolve_config(ml_collections.ConfigDict(meta["model_config"]))
            key = "ema_params" if weights == "ema" else "params"
            dtype = np.dtype(cfg.param_dtype)
            target = {key: jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype),
                                                  model_lib.param_shapes(cfg))}
            restore_args = jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True)))
            return restored["state"][key], cfg
    return convert.load_orbax(path, weights=weights)
