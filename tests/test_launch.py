"""launch/: every launcher's dry run prints the exact command it would run, and that command parses.

No scheduler is needed: the SLURM script runs against stand-in `srun`/`scontrol` executables,
and the XManager plan is plain Python (xmanager stays optional).
"""

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SBATCH = os.path.join(LAUNCH, "slurm", "train.sbatch")
SHELL_SCRIPTS = [os.path.join(LAUNCH, "local.sh"), SBATCH]

sys.path.insert(0, LAUNCH)
import jobs  # noqa: E402
import xm_plan  # noqa: E402

from fmlm_jax import config as fmlm_config  # noqa: E402


def run(argv, env=None, **kwargs):
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=120, **kwargs)


def parse_main_flags(args):
    """The config fmlm_jax.main would get from these flags (config_flags, locked)."""
    argv = ["fmlm_jax.main", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(argv)
    return values.config, values.workdir


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=os.path.basename)
def test_shell_scripts_parse(script):
    result = run(["bash", "-n", script])
    assert result.returncode == 0, result.stderr


def test_local_dry_run_prints_the_command():
    result = run(["bash", "launch/local.sh", "--dry-run", "--config=configs/lm1b_flm.py",
                  "--config.train.lr=1e-4", "--config.sample.steps=(1, 2)"], env={"PYTHON": "python3"})
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[:3] == ["python3", "-m", "fmlm_jax.main"]
    config, workdir = parse_main_flags(argv[3:])
    assert workdir == "runs/lm1b_flm"  # the default: runs/CONFIG_NAME
    assert config.train.lr == 1e-4 and tuple(config.sample.steps) == (1, 2)

    forced = run(["bash", "launch/local.sh", "--dry-run", "--platform=cpu", "--config=configs/tiny_flm.py",
                  "--workdir=/tmp/w"], env={"PYTHON": "python3"})
    assert shlex.split(forced.stdout)[:2] == ["JAX_PLATFORMS=cpu", "python3"]
    assert "--workdir=/tmp/w" in forced.stdout


def test_local_refuses_a_missing_config():
    result = run(["bash", "launch/local.sh", "--dry-run"])
    assert result.returncode == 2 and "--config=configs/NAME.py" in result.stderr
    result = run(["bash", "launch/local.sh", "--dry-run", "--config=configs/nope.py"])
    assert result.returncode == 2 and "no config file" in result.stderr


@pytest.mark.slow  # the whole loop (TensorFlow import, compile, checkpoint): ~20 s idle, a minute loaded
def test_local_runs_the_tiny_config(tmp_path):
    """The launcher's command really trains: 2 steps of configs/tiny_flm.py (no eval/sampling compile)."""
    workdir = tmp_path / "tiny"
    args = ["bash", "launch/local.sh", "--platform=cpu", "--config=configs/tiny_flm.py",
            f"--workdir={workdir}", "--config.data.batch_size=8", "--config.train.num_steps=2",
            "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.sample_every=0"]
    result = run(args, env={"PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if "train/loss" in r] == [1, 2]


# ----------------------------------------------------------------------------- SLURM


def slurm(*args):
    return run([sys.executable, "launch/slurm.py", *args])


def test_slurm_dry_run_prints_sbatch_and_srun():
    result = slurm("--config=configs/owt_flm.py", "--workdir-root=/shared/runs", "--nodes=4",
                   "--gpus-per-node=8", "--partition=gpu", "--time=24:00:00", "--dry-run", "--",
                   "--config.train.lr=1e-4")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    sbatch, env, srun = (shlex.split(line) for line in lines)
    assert sbatch[0] == "sbatch"
    options = ("--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=8", "--partition=gpu", "--time=24:00:00")
    for option in options:
        assert option in sbatch
    assert sbatch[-4:] == ["launch/slurm/train.sbatch", "configs/owt_flm.py", "/shared/runs/owt_flm",
                           "--config.train.lr=1e-4"]
    assert "FMLM_JAX_DISTRIBUTED=1" in env and "JAX_LOCAL_DEVICE_IDS=0" in env
    assert srun[:4] == ["srun", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-task=1"]
    i = srun.index("-m")
    assert srun[i + 1] == "fmlm_jax.main"
    config, workdir = parse_main_flags(srun[i + 2:])
    assert workdir == "/shared/runs/owt_flm" and config.train.lr == 1e-4


def test_slurm_one_process_per_node_sees_every_gpu():
    result = slurm("--config=configs/lm1b_flm.py", "--workdir-root=/r", "--nodes=2", "--gpus-per-node=4",
                   "--per=node", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "--ntasks-per-node=1" in result.stdout and "--gpus-per-task" not in result.stdout
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in result.stdout


def test_slurm_sweep_gives_one_job_per_point_and_checks_overrides():
    result = slurm("--config=configs/lm1b_flm.py", "--workdir-root=/r", "--sweep", "--dry-run")
    sbatch_lines = [line for line in result.stdout.splitlines() if line.startswith("sbatch")]
    points = fmlm_config.sweep(os.path.join(ROOT, "configs", "lm1b_flm.py"))
    assert len(sbatch_lines) == len(points)
    workdirs = {shlex.split(line)[-2] for line in sbatch_lines}
    assert len(workdirs) == len(points) and all(w.startswith("/r/lm1b_flm/") for w in workdirs)
    bad = slurm("--config=configs/lm1b_flm.py", "--workdir-root=/r", "--dry-run", "--",
                "--config.train.lrr=1")
    assert bad.returncode != 0 and "train.lrr" in bad.stderr


def test_sbatch_requeues_itself_on_the_time_limit_signal(tmp_path):
    """USR1 (sent by SLURM 300 s before the limit) → `scontrol requeue JOB` and the step is stopped."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    (bin_dir / "srun").write_text(
        f'#!/bin/bash\necho "srun $* FMLM_JAX_DISTRIBUTED=$FMLM_JAX_DISTRIBUTED" >> {log}\nexec sleep 60\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": "2", "FMLM_GPUS_PER_NODE": "8"}
    out_path = tmp_path / "out"
    with open(out_path, "w") as out_file:  # a file, not a pipe: the stand-in step inherits it
        proc = subprocess.Popen(["bash", SBATCH, "configs/lm1b_flm.py", str(tmp_path / "w")], cwd=ROOT,
                                env=env, stdout=out_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 30
        while not (log.exists() and "srun" in log.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=30) != 0  # the step was stopped, not finished
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the script and its stand-in step only
    out = out_path.read_text()
    calls = log.read_text().splitlines()
    assert calls[0].startswith("srun --nodes=2 --ntasks-per-node=8 --gpus-per-task=1")
    assert "--workdir=" + str(tmp_path / "w") in calls[0] and calls[0].endswith("FMLM_JAX_DISTRIBUTED=1")
    assert calls[1] == "scontrol requeue 4242"
    assert "requeueing job 4242" in out, out


def test_sbatch_needs_the_gpu_count():
    env = {"FMLM_DRY_RUN": "1", "FMLM_GPUS_PER_NODE": "", "SLURM_GPUS_ON_NODE": ""}
    result = run(["bash", SBATCH, "configs/lm1b_flm.py", "/w"], env=env)
    assert result.returncode == 2 and "FMLM_GPUS_PER_NODE" in result.stderr


# ----------------------------------------------------------------------------- XManager


def test_xm_plan_one_job_per_sweep_point_under_the_bucket():
    plan = xm_plan.build_plan("configs/lm1b_flm.py", "vertex", "h100", "8", bucket="gs://my-bucket",
                              sweep=True, overrides=["train.num_steps=1000"], repo_root=ROOT)
    points = fmlm_config.sweep(os.path.join(ROOT, "configs", "lm1b_flm.py"))
    assert len(plan.jobs) == len(points)
    assert len({job.workdir for job in plan.jobs}) == len(points)
    for job, point in zip(plan.jobs, points, strict=True):
        assert job.workdir.startswith("/gcs/my-bucket/fmlm/lm1b_flm/")  # Vertex's Cloud Storage mount
        config, workdir = parse_main_flags(job.args())
        assert workdir == job.workdir and config.train.num_steps == 1000
        assert config.train.lr == point["train.lr"]
    assert any('jax[cuda12]==' in step for step in plan.docker_instructions)
    text = xm_plan.describe(plan)
    for job in plan.jobs:
        assert jobs.shell_line(job.command()) in text


def test_xm_plan_tpu_on_gke_and_refusals():
    plan = xm_plan.build_plan("configs/owt_fmlm.py", "gke", "tpu_v5p", "4x4x4", bucket="gs://b",
                              repo_root=ROOT)
    assert plan.jobs[0].workdir == "gs://b/fmlm/owt_fmlm"
    assert plan.env_vars == {"FMLM_JAX_DISTRIBUTED": "1"}
    assert any('jax[tpu]==' in step for step in plan.docker_instructions)
    with pytest.raises(ValueError, match="executor=gke"):
        xm_plan.build_plan("configs/owt_flm.py", "vertex", "tpu_v5p", "2x2x1", bucket="gs://b")
    with pytest.raises(ValueError, match="launch/local.sh"):
        xm_plan.build_plan("configs/owt_flm.py", "local", "tpu_v4", "2x2x1")
    with pytest.raises(ValueError, match="--bucket=gs://"):
        xm_plan.build_plan("configs/owt_flm.py", "vertex", "a100", "8")
    with pytest.raises(ValueError, match="--quantity"):
        xm_plan.build_plan("configs/owt_flm.py", "vertex", "a100", "", bucket="gs://b")


def test_xm_launch_dry_run_needs_no_xmanager():
    result = run([sys.executable, "launch/xm_launch.py", "--config=configs/tiny_fmlm.py", "--sweep",
                  "--dry_run", "--override=train.num_steps=10"])
    assert result.returncode == 0, result.stderr
    commands = [line.strip() for line in result.stdout.splitlines() if "-m fmlm_jax.main" in line]
    assert len(commands) == 3  # tiny_fmlm.sweep(): psd, lsd, esd
    methods = [parse_main_flags(shlex.split(c)[3:])[0].distill.method for c in commands]
    assert methods == ["psd", "lsd", "esd"]


@pytest.mark.skipif(importlib.util.find_spec("xmanager") is not None, reason="xmanager is installed")
def test_xm_launch_submission_explains_how_to_install_xmanager():
    result = run([sys.executable, "launch/xm_launch.py", "--config=configs/tiny_flm.py"])
    assert result.returncode != 0
    assert "pip install xmanager==0.8.5.post1" in result.stderr
