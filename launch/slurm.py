"""Submits fmlm_jax training to a SLURM GPU cluster: one `sbatch launch/slurm/train.sbatch` per job.

    # print the sbatch command(s) and the srun line each job will run; submit nothing
    python launch/slurm.py --config=configs/owt_flm.py --workdir-root=/shared/runs \
        --nodes=4 --gpus-per-node=8 --time=48:00:00 --partition=gpu --dry-run
    # one job per point of the config's sweep(), extra overrides for every job
    python launch/slurm.py --config=configs/lm1b_flm.py --workdir-root=/shared/runs --sweep \
        --nodes=1 --gpus-per-node=8 -- --config.train.num_steps=200000

Each job's workdir is WORKDIR_ROOT/CONFIG_NAME[/SWEEP_POINT]; a requeued job resumes from it
(see launch/slurm/train.sbatch for the process layout, jax.distributed and requeueing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jobs as jobs_lib  # noqa: E402

SBATCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm", "train.sbatch")


def _script_path() -> str:
    """train.sbatch relative to the working directory when below it (readable dry runs)."""
    rel = os.path.relpath(SBATCH_SCRIPT)
    return SBATCH_SCRIPT if rel.startswith("..") else rel


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a get_config() file, e.g. configs/owt_flm.py")
    parser.add_argument("--workdir-root", required=True,
                        help="a directory every node can read and write; jobs write ROOT/NAME")
    parser.add_argument("--sweep", action="store_true", help="one job per point of the config's sweep()")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--per", choices=("gpu", "node"), default="gpu",
                        help="one process per GPU (default) or per node")
    parser.add_argument("--cpus-per-gpu", type=int, default=8)
    parser.add_argument("--time", default="48:00:00", help="time limit per run; the job requeues itself")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--qos", default="")
    parser.add_argument("--python", default="python",
                        help="the interpreter on the compute nodes (e.g. /shared/fmlm-jax/.venv/bin/python)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, submit nothing")
    parser.add_argument("overrides", nargs="*", help="after --: --config.KEY=VALUE for every job")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error(f"--nodes and --gpus-per-node must be ≥ 1, got {args.nodes} and {args.gpus_per_node}")
    return args


def sbatch_command(job: jobs_lib.Job, args: argparse.Namespace) -> list[str]:
    """The sbatch line of one job: resources, the job's environment, then the script's arguments."""
    tasks_per_node = args.gpus_per_node if args.per == "gpu" else 1
    cmd = [
        "sbatch",
        f"--job-name=fmlm-{job.name.replace('/', '-')}",
        f"--nodes={args.nodes}",
        f"--gpus-per-node={args.gpus_per_node}",
        f"--ntasks-per-node={tasks_per_node}",
        f"--cpus-per-task={args.cpus_per_gpu * args.gpus_per_node // tasks_per_node}",
        f"--time={args.time}",
    ]
    cmd += [f"--{flag}={value}" for flag, value in
            (("partition", args.partition), ("account", args.account), ("qos", args.qos)) if value]
    cmd.append(f"--export=ALL,FMLM_PROCS_PER={args.per},FMLM_GPUS_PER_NODE={args.gpus_per_node},"
               f"PYTHON={args.python}")
    return cmd + [_script_path(), *script_args(job)]


def script_args(job: jobs_lib.Job) -> list[str]:
    return [job.config, job.workdir, *jobs_lib.override_flags(job.overrides)]


def srun_line(job: jobs_lib.Job, args: argparse.Namespace) -> str:
    """What the batch script will run, printed by the script itself (FMLM_DRY_RUN=1)."""
    env = {**os.environ, "FMLM_DRY_RUN": "1", "FMLM_PROCS_PER": args.per,
           "FMLM_GPUS_PER_NODE": str(args.gpus_per_node), "SLURM_NNODES": str(args.nodes),
           "PYTHON": args.python}
    out = subprocess.run(["bash", SBATCH_SCRIPT, *script_args(job)], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    overrides = [o for o in args.overrides if o != "--"]
    try:
        jobs = jobs_lib.build_jobs(args.config, args.workdir_root, args.sweep, overrides)
    except (AttributeError, FileNotFoundError, KeyError, ValueError) as e:
        raise SystemExit(f"error: {e.args[0] if e.args else e}") from None
    if not args.dry_run and shutil.which("sbatch") is None:
        raise SystemExit("sbatch not found: run this on a SLURM login node, or add --dry-run")
    for job in jobs:
        sbatch = sbatch_command(job, args)
        print(f"# {job.name} → {job.workdir}")
        print(jobs_lib.shell_line(sbatch))
        if args.dry_run:
            print("# the batch script then runs:")
            print(srun_line(job, args))
        else:
            subprocess.run(sbatch, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
