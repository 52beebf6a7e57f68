"""`python -m fmlm_jax.main` refuses bad input in one line, as a user would meet it (real
subprocesses). Training and resuming through the CLI: tests/test_train.py (SIGTERM test);
the loop itself: tests/test_train.py."""

import subprocess
import sys

from conftest import ROOT

BASE = [sys.executable, "-m", "fmlm_jax.main", "--config=configs/tiny_flm.py", "--config.model.n_blocks=1",
        "--config.train.num_steps=4", "--config.train.log_every=2", "--config.train.save_every=2",
        "--config.train.eval_every=0", "--config.train.sample_every=0"]


def run(*args, workdir):
    return subprocess.run([*BASE, f"--workdir={workdir}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_refusals_are_one_line_with_exit_code_2_and_leave_nothing_behind(tmp_path):
    cases = {
        "misspelt": (["--config.train.num_stepz=3"],
                     "no config field 'num_stepz': Did you mean \"num_steps\""),
        "accumulation": (["--config.train.grad_accum_steps=3"], "grad_accum_steps 3 must divide"),
        "mode": (["--config.mode=fmlm"], "mode='fmlm' trains a two-time student"),
    }
    for name, (args, expected) in cases.items():
        workdir = tmp_path / name
        result = run(*args, workdir=workdir)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (name, lines)
        assert not workdir.exists()  # nothing created on a refusal
    verbose = run("--config.train.grad_accum_steps=3", "--verbose", workdir=tmp_path / "v")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr  # --verbose shows it
