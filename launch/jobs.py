"""Jobs from a config file: sweep points → workdirs → the exact `fmlm_jax.main` command lines.

Plain Python shared by launch/xm_launch.py and launch/slurm.py (no XManager, no SLURM needed),
so that every launcher's dry run prints exactly what it would run.

A config file's optional `sweep()` returns override dicts keyed by config path without the
leading 'config.' (`{"train.lr": 1e-4}`); each becomes one job whose flags are
`--config.train.lr=0.0001` and whose workdir is ROOT/CONFIG_NAME/POINT_NAME.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

MAIN_MODULE = "fmlm_jax.main"


@dataclasses.dataclass(frozen=True)
class Job:
    name: str  # unique within a launch: CONFIG_NAME or CONFIG_NAME/POINT_NAME
    config: str  # the config file path, as given
    workdir: str
    overrides: dict  # {"train.lr": 1e-4, ...}: the sweep point and the user's overrides

    def args(self) -> list[str]:
        """The flags of `python -m fmlm_jax.main`."""
        return [f"--config={self.config}", f"--workdir={self.workdir}", *override_flags(self.overrides)]

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", MAIN_MODULE, *self.args()]


def load_config_module(path: str) -> ModuleType:
    """Imports a config file by path (it may import its siblings, as configs/*.py do)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path!r}; pass e.g. --config=configs/lm1b_flm.py")
    name = "_fmlm_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path!r} has no get_config()")
    return module


def format_value(value: Any) -> str:
    """A value as `ml_collections.config_flags` parses it back (floats keep their exact repr)."""
    if isinstance(value, tuple | list):
        return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value) if isinstance(value, float) else str(value)


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
    return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


def parse_override(text: str) -> tuple[str, str]:
    """'train.lr=1e-4' (or '--config.train.lr=1e-4') → ('train.lr', '1e-4'); values stay strings."""
    key, sep, value = text.removeprefix("--").removeprefix("config.").partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} is not KEY=VALUE (e.g. train.lr=1e-4)")
    return key, value


def check_overrides(config, overrides: Mapping[str, Any], where: str) -> None:
    """Every override key must name an existing field: a misspelt sweep fails before submission."""
    for key in overrides:
        node = config
        for i, part in enumerate(key.split(".")):
            if not hasattr(node, "keys") or part not in node:
                known = sorted(node.keys()) if hasattr(node, "keys") else []
                raise KeyError(f"{where}: override {key!r} names no config field "
                               f"({'.'.join(key.split('.')[:i]) or 'config'} has {known})")
            node = node[part]


def point_name(overrides: Mapping[str, Any]) -> str:
    """{"train.lr": 1e-4, "seed": 1} → 'lr=0.0001,seed=1' (the last path component of each key)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={format_value(value)}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "", ",".join(parts))


def sweep_points(module: ModuleType, sweep: bool) -> list[dict]:
    """The config's sweep() points, or one empty point without --sweep."""
    if not sweep:
        return [{}]
    if not hasattr(module, "sweep"):
        raise AttributeError(f"{module.__file__} has no sweep(); drop --sweep or add one")
    points = list(module.sweep())
    if not points or not all(isinstance(p, dict) for p in points):
        raise ValueError(f"{module.__file__}: sweep() must return a non-empty list of override dicts")
    return points


def build_jobs(config_path: str, workdir_root: str, sweep: bool = False,
               overrides: Sequence[str] = (), prefix: str | None = None) -> list[Job]:
    """One Job per sweep point (one job without `sweep`), checked against the config's fields.

    Job names (and workdirs below `workdir_root`) are PREFIX or PREFIX/POINT_NAME; PREFIX is
    the config file's name unless given. overrides: 'KEY=VALUE' strings applied to every job
    after the sweep point.
    """
    module = load_config_module(config_path)
    config = module.get_config()
    extra = dict(parse_override(o) for o in overrides)
    check_overrides(config, extra, config_path)
    base = prefix or os.path.splitext(os.path.basename(config_path))[0]
    jobs = []
    for point in sweep_points(module, sweep):
        check_overrides(config, point, f"{config_path} sweep()")
        name = f"{base}/{point_name(point)}" if point else base
        jobs.append(Job(name, config_path, join(workdir_root, name), {**point, **extra}))
    if len({j.name for j in jobs}) != len(jobs):
        raise ValueError(f"{config_path}: sweep() has duplicate points: {[j.name for j in jobs]}")
    return jobs


def join(root: str, name: str) -> str:
    """os.path.join that also keeps gs:// roots intact."""
    return root.rstrip("/") + "/" + name if root else name


def shell_line(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
