"""Planted bugs as a standing check: every mutant must be killed by the tests named beside it.

    python tests/mutants.py              # all mutants; exit 1 if any survives
    python tests/mutants.py --list       # names only
    python tests/mutants.py --only psd_student_at_the_midpoint,lsd_dtau_dt_at_s

For each mutant the package, tests and configs are copied to a temporary directory, one
snippet of the source is replaced (it must occur exactly once, so a mutant cannot go stale
silently), and the named tests run there against the copy (PYTHONPATH). A mutant is killed
when those tests fail; it survives when they pass. Its last line is one JSON object:
{"mutants": N, "killed": K, "survivors": [names]}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("fmlm_jax", "tests", "configs", "benchmarks", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the root
    why: str = ""


DISTILL = "fmlm_jax/objectives/distill/"
ASSEMBLY = "tests/test_distill.py::test_distill_loss_equals_the_numpy_assembly_of_the_spec"

MUTANTS = (
    Mutant("psd_student_at_the_midpoint", DISTILL + "loss.py",
           "log_p = nets.student(r.x, r.tau_s, r.tau_t)", "log_p = nets.student(r.x, r.tau_s, r.tau_u)",
           (ASSEMBLY,), "the PSD student evaluated at (τ_s, τ_u) instead of (τ_s, τ_t)"),
    Mutant("diagonal_target_ignores_the_teacher", DISTILL + "loss.py",
           "    if nets.teacher is None:  # self-distillation", "    if True:  # self-distillation",
           (ASSEMBLY,), "the diagonal rows trained towards the data one-hot although a teacher is given"),
    Mutant("esd_boundary_rows_not_masked", DISTILL + "loss.py",
           "return jnp.sum((delta - target) ** 2, axis=-1), r.t < 1.0",
           "return jnp.sum((delta - target) ** 2, axis=-1), jnp.ones_like(r.t, bool)",
           (ASSEMBLY,), "ESD's t = 1 rows left in the loss"),
    Mutant("lsd_dtau_dt_at_s", DISTILL + "loss.py",
           "schedule.dtau_dt(r.t), dc.entmax_temp_lsd", "schedule.dtau_dt(r.s), dc.entmax_temp_lsd",
           (ASSEMBLY,), "LSD's chain-rule factor dτ/dt taken at s instead of t"),
    Mutant("lsd_divides_by_dtau_dt", DISTILL + "targets.py",
           "d_delta_dt = delta * jax.lax.stop_gradient(dlog_p_dtau) * rows(dtau_dt_t)",
           "d_delta_dt = delta * jax.lax.stop_gradient(dlog_p_dtau) / rows(dtau_dt_t)",
           (ASSEMBLY, "tests/test_distill.py::test_lsd_target_equals_the_exact_two_time_denoiser"),
           "LSD divides by dτ/dt instead of multiplying"),
)


def _copy_tree(dest: str) -> None:
    for name in COPIED:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, dest)


def _apply(dest: str, mutant: Mutant) -> None:
    path = os.path.join(dest, mutant.path)
    with open(path) as f:
        source = f.read()
    count = source.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: the snippet occurs {count} times in {mutant.path} "
                         "(expected once); update tests/mutants.py")
    with open(path, "w") as f:
        f.write(source.replace(mutant.old, mutant.new))


def run_mutant(mutant: Mutant, python: str) -> tuple[str, float, str]:
    """('killed' | 'survived' | 'error', seconds, pytest's last lines)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as dest:
        _copy_tree(dest)
        _apply(dest, mutant)
        env = dict(os.environ, PYTHONPATH=dest)
        cmd = [python, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
               "-o", "addopts=", *mutant.tests]
        start = time.time()
        proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
        seconds = time.time() - start
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    outcome = {0: "survived", 1: "killed"}.get(proc.returncode, "error")
    return outcome, seconds, tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true")
    p.add_argument("--only", default="", help="comma-separated mutant names")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}: {m.why} [{', '.join(m.tests)}]")
        return 0
    if args.only and len(chosen) != len(set(args.only.split(","))):
        raise SystemExit(f"unknown mutant in --only: {args.only}")
    survivors, errors = [], []
    for m in chosen:
        outcome, seconds, tail = run_mutant(m, sys.executable)
        print(f"{outcome:>8}  {m.name}  ({seconds:.0f} s)  {m.why}", flush=True)
        if outcome != "killed":
            print("          " + tail.replace("\n", "\n          "), flush=True)
            (survivors if outcome == "survived" else errors).append(m.name)
    print(json.dumps({"mutants": len(chosen), "killed": len(chosen) - len(survivors) - len(errors),
                      "survivors": survivors, "errors": errors}))
    return 1 if survivors or errors else 0


if __name__ == "__main__":
    sys.exit(main())
