"""Jobs from a config file: sweep points → workdirs → the exact `fmlm_jax.main` command lines.

Plain Python shared by launch/xm_launch.py and launch/slurm.py (no XManager, no SLURM needed),
so that every launcher's dry run prints exactly what it would run.

A config file's optional `sweep()` returns override dicts keyed by config path without the
leading 'config.' (`{"train.lr": 1e-4}`); each becomes one job whose flags are
`--config.train.lr=0.0001` and whose workdir is ROOT/CONFIG_NAME/POINT_NAME.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from fmlm_jax import config as fmlm_config

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


def sweep_points(config_path: str, sweep: bool) -> list[dict]:
    """The config file's sweep() points, or one empty point without --sweep."""
    if not sweep:
        return [{}]
    points = fmlm_config.sweep(config_path)
    if points == [{}]:
        raise AttributeError(f"{config_path} has no sweep(); drop --sweep or add one")
    if not points or not all(isinstance(p, dict) for p in points):
        raise ValueError(f"{config_path}: sweep() must return a non-empty list of override dicts")
    return points


def build_jobs(config_path: str, workdir_root: str, sweep: bool = False,
               overrides: Sequence[str] = (), prefix: str | None = None) -> list[Job]:
    """One Job per sweep point (one job without `sweep`), checked against the config's fields.

    Job names (and workdirs below `workdir_root`) are PREFIX or PREFIX/POINT_NAME; PREFIX is
    the config file's name unless given. overrides: 'KEY=VALUE' strings applied to every job
    after the sweep point.
    """
    config = fmlm_config.load(config_path)
    extra = dict(parse_override(o) for o in overrides)
    check_overrides(config, extra, config_path)
    base = prefix or os.path.splitext(os.path.basename(config_path))[0]
    jobs = []
    for point in sweep_points(config_path, sweep):
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
