"""The training loop and CLI: metrics, checkpoints, exact resume, distillation by path."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from fmlm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loop_config(num_steps, **model):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import synthetic_demo

    config = synthetic_demo.get_config()
    config.model.n_blocks = 1
    config.model.dropout = 0.1  # dropout on: the step rng must be reproduced too
    config.model.update(model)
    config.data.batch_size = 8
    config.train.update(num_steps=num_steps, log_every=1, save_every=5)
    return config


def losses(rows):
    return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in rows]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = train.train_and_evaluate(loop_config(12), str(tmp_path / "a"), log=lambda *_: None)
    first = train.train_and_evaluate(loop_config(7), str(tmp_path / "b"), log=lambda *_: None)
    messages = []
    second = train.train_and_evaluate(loop_config(12), str(tmp_path / "b"), log=messages.append)
    assert messages[0] == f"resumed from {tmp_path / 'b'} at step 7"
    assert losses(first + second) == losses(full)  # bitwise: the floats compare equal
    assert [r["step"] for r in full] == list(range(1, 13))
    logged = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in logged] == list(range(1, 13))


@pytest.mark.slow  # tests/test_checkpoints.py covers the refusal without the loop's compile
def test_a_workdir_of_another_architecture_is_refused(tmp_path):
    train.train_and_evaluate(loop_config(5), str(tmp_path), log=lambda *_: None)
    with pytest.raises(ValueError, match="hidden_size"):
        train.train_and_evaluate(loop_config(10, hidden_size=48), str(tmp_path), log=lambda *_: None)


def test_distillation_from_a_teacher_workdir(tmp_path):
    train.train_and_evaluate(loop_config(5), str(tmp_path / "teacher"), log=lambda *_: None)
    config = loop_config(4, two_time=True)
    config.mode = "distill"
    config.distill = ml_collections.ConfigDict(dict(
        method="psd", use_teacher=True, teacher_path=str(tmp_path / "teacher"),
        diagonal_fraction=0.5, boundary_prob=4.0, offdiag_sampling="uniform_diff",
        use_mse_loss_psd=False, rescale_offdiag_loss_psd=False, use_ema_for_psd_target=False,
        use_teacher_for_D_t_lsd=False, entmax_temp_lsd=2.0))
    rows = train.train_and_evaluate(config, str(tmp_path / "student"), log=lambda *_: None)
    assert len(rows) == 4 and all(np.isfinite(r["train/loss"]) for r in rows)
    assert {"train/diag_loss", "train/offdiag_loss"} <= set(rows[0])
    from fmlm_jax import checkpoints

    meta = checkpoints.read_metadata(checkpoints.open_manager(tmp_path / "student", read_only=True))
    assert meta["teacher"]["path"] == str(tmp_path / "teacher")
    assert meta["teacher"]["model_fingerprint"] == checkpoints.model_fingerprint(loop_config(5).model)
    config.distill.teacher_path = ""
    with pytest.raises(ValueError, match="teacher_path"):
        train.train_and_evaluate(config, str(tmp_path / "other"), log=lambda *_: None)


def test_cli_runs_and_rejects_unknown_keys(tmp_path):
    base = [sys.executable, "-m", "fmlm_jax.main", "--config=configs/synthetic_demo.py",
            f"--workdir={tmp_path}", "--config.model.n_blocks=1", "--config.train.num_steps=6",
            "--config.train.log_every=3", "--config.train.save_every=3"]
    done = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 6/6: loss" in done.stdout
    assert sorted(d for d in os.listdir(tmp_path) if d.isdigit()) == ["3", "6"]
    bad = subprocess.run(base + ["--config.train.num_stepz=3"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "num_stepz" in bad.stderr
