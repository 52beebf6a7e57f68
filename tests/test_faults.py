"""Faults and bad input (issue #13): a damaged checkpoint step, a malicious or random pickle, a
full disk during a save, an unwritable output, kill -9 during an async save and during a
conversion. Fast cases use checkpoints of a tiny model written here; the subprocess and kill
cases are `slow`."""

import errno
import glob
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest
import torch
from conftest import ROOT, quiet, run_config, synthetic_model
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from fmlm_jax import atomic, checkpoints, errors, train
from fmlm_jax.convert import cli as convert_cli
from fmlm_jax.convert import torch_io

STEPS = (2, 4, 6)


def tiny_config():
    return run_config("flm", model=synthetic_model(n_blocks=1))


def state_at(config, step):
    """A distinct train state per step (its own init key), so a restore says which step it read."""
    return train.create_train_state(config, jax.random.key(step))


def write_run(workdir, config, steps=STEPS):
    """A run workdir with `steps`, each holding state, the data position (= the step) and meta."""
    it = iter(grain.MapDataset.range(100))
    done = 0
    with checkpoints.open_manager(workdir, max_to_keep=None, async_save=False) as manager:
        for step in steps:
            for _ in range(step - done):
                next(it)
            done = step
            checkpoints.save(manager, step, state_at(config, step), data_iterator=it, config=config)


def largest_array_file(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    return max(files, key=os.path.getsize)


def truncate_state(d):
    with open(largest_array_file(d), "r+b") as f:
        f.truncate(100)


def garbage_meta(d):
    with open(os.path.join(d, "meta", "metadata"), "wb") as f:
        f.write(bytes(range(200, 256)) * 4)


def delete_meta(d):
    shutil.rmtree(os.path.join(d, "meta"))


def broken_iterator_json(d):
    (path,) = glob.glob(os.path.join(d, "data", "*.json"))
    with open(path, "w") as f:
        f.write("{ broken")


def delete_state_metadata(d):
    os.remove(os.path.join(d, "state", "_METADATA"))


CORRUPTIONS = {"truncated state file": (truncate_state, "state: "),
               "garbage in meta/metadata": (garbage_meta, "meta: "),
               "meta/ deleted": (delete_meta, "meta: "),
               "broken data-iterator JSON": (broken_iterator_json, "data: "),
               "state/_METADATA deleted": (delete_state_metadata, "state: ")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A pristine run workdir (steps 2, 4, 6); tests corrupt copies of it."""
    root = tmp_path_factory.mktemp("faults") / "run"
    write_run(str(root), tiny_config())
    return root


def fresh_copy(run_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run_dir, workdir)
    return workdir


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_same(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ item 1: damaged steps


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_damaged_newest_step_is_moved_aside_and_the_run_resumes_from_the_newest_good_one(
        case, run_dir, tmp_path):
    corrupt, item = CORRUPTIONS[case]
    config, workdir = tiny_config(), fresh_copy(run_dir, tmp_path)
    corrupt(str(workdir / "6"))
    warnings, it = [], iter(grain.MapDataset.range(100))
    with checkpoints.open_manager(workdir) as manager:
        state, step = checkpoints.restore_latest(manager, state_at(config, 0), data_iterator=it,
                                                 config=config, warn=warnings.append)
        assert manager.all_steps() == [2, 4]
    assert step == 4 and next(it) == 4  # state, data position: both of step 4
    assert_same(state.params, state_at(config, 4).params)
    (aside,) = glob.glob(str(workdir / "6.corrupt-*"))  # moved aside, never deleted
    assert os.path.isdir(aside) and not (workdir / "6").exists()
    (warning,) = warnings
    assert f"checkpoint {workdir / '6'} cannot be restored ({item}" in warning, warning
    assert f"moved it to {aside}; resuming from step 4" in warning
    with checkpoints.open_manager(workdir) as manager:  # the next start: no warning, still step 4
        assert checkpoints.restore_latest(manager, state_at(config, 0), config=config,
                                          warn=warnings.append)[1] == 4
    assert len(warnings) == 1


def test_when_no_step_restores_one_error_names_them_all_and_nothing_moves(run_dir, tmp_path):
    config, workdir = tiny_config(), fresh_copy(run_dir, tmp_path)
    garbage_meta(str(workdir / "6"))
    delete_state_metadata(str(workdir / "4"))
    broken_iterator_json(str(workdir / "2"))
    with checkpoints.open_manager(workdir) as manager:
        with pytest.raises(errors.UnreadableCheckpointError) as err:
            checkpoints.restore_latest(manager, state_at(config, 0),
                                       data_iterator=iter(grain.MapDataset.range(9)), config=config)
    line = errors.message(err.value)
    assert "\n" not in line and f"no checkpoint step in {workdir} can be restored" in line
    assert "step 6: meta: " in line and "step 4: state: " in line and "step 2: data: " in line
    assert sorted(os.listdir(workdir)) == ["2", "4", "6"]


def test_another_architecture_is_refused_not_skipped(run_dir, tmp_path):
    """Falling back is for damage only: a workdir of another model is still refused at once."""
    workdir = fresh_copy(run_dir, tmp_path)
    other = run_config("flm", model=synthetic_model(n_blocks=2))
    with checkpoints.open_manager(workdir) as manager:
        with pytest.raises(ValueError, match="written for another model"):
            checkpoints.restore_latest(manager, state_at(other, 0), config=other)
    assert sorted(os.listdir(workdir)) == ["2", "4", "6"]


@pytest.mark.parametrize("case", ["truncated state file", "garbage in meta/metadata"])
def test_load_falls_back_to_the_newest_good_step_and_names_it(case, run_dir, tmp_path, capsys):
    workdir = fresh_copy(run_dir, tmp_path)
    CORRUPTIONS[case][0](str(workdir / "6"))
    loaded = checkpoints.load_checkpoint(workdir, "raw")
    assert loaded.step == 4
    assert_same(loaded.params, state_at(tiny_config(), 4).params)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: checkpoint {workdir / '6'} cannot be restored")
    assert lines[0].endswith("using step 4 instead")
    assert (workdir / "6").is_dir()  # someone else's workdir (a teacher's): left in place
    with pytest.raises(errors.UnreadableCheckpointError, match="step 6: "):
        checkpoints.load(workdir / "6")  # a step asked for by name: no fallback


# ------------------------------------------------------------------ item 2: unsafe pickles


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_an_os_system_pickle_is_refused_as_unsafe_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    zipped, bare = tmp_path / "evil.ckpt", tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _System(marker)}, zipped)
    bare.write_bytes(pickle.dumps({"state_dict": {}, "x": _System(marker)}))
    for path in (zipped, bare):
        with pytest.raises(errors.UnsafeCheckpointError, match=r"refusing to unpickle (posix|nt)\.system"):
            torch_io.read_torch_checkpoint(path)
        assert convert_cli.cli(["torch-to-orbax", "--src", str(path), "--out", str(tmp_path / "o")]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and "weights_only" not in line
        assert "convert it with the authors' code or export safetensors" in line
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_random_bytes_are_unreadable_without_torchs_advice(tmp_path, capsys):
    path = tmp_path / "random.ckpt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert convert_cli.cli(["torch-to-orbax", "--src", str(path), "--out", str(tmp_path / "o")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {path} is not a readable torch checkpoint (")
    assert "weights_only" not in line


def test_unsafe_globals():
    assert torch_io.is_unsafe_global("posix.system") and torch_io.is_unsafe_global("builtins.eval")
    assert torch_io.is_unsafe_global("subprocess.Popen") and torch_io.is_unsafe_global("os.path.join")
    assert not torch_io.is_unsafe_global("builtins.dict")  # omegaconf pickles name plain types
    assert not torch_io.is_unsafe_global("omegaconf.dictconfig.DictConfig")


# ------------------------------------------------------------------ item 3: refusals, outputs


def test_an_unwritable_output_is_refused_before_the_work_in_one_line(run_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    for out in ("x.safetensors", "x.ckpt"):
        assert convert_cli.cli(["orbax-to-torch", "--src", str(run_dir), "--out", str(blocker / out)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == f"error: not a directory ({blocker}): a file is in the way: check the path", line
    with pytest.raises(PermissionError) as err:
        atomic.check_writable(str(_unwritable_directory(tmp_path)))
    assert errors.message(err.value).startswith("permission denied (")


def _unwritable_directory(tmp_path):
    if os.geteuid() != 0:
        path = tmp_path / "read-only"
        path.mkdir(mode=0o555)
        return path
    try:  # root ignores modes; sysfs refuses new files even to root
        atomic.check_writable("/sys")
    except PermissionError:
        return "/sys"
    except OSError:
        pass
    pytest.skip("no directory this user cannot write to")


def test_outputs_get_the_usual_modes(run_dir, tmp_path):
    out = tmp_path / "w.safetensors"
    assert convert_cli.main(["orbax-to-torch", "--src", str(run_dir), "--out", str(out)]) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask


def test_a_missing_teacher_is_refused_and_leaves_no_workdir(tmp_path):
    config = run_config("fmlm", distill=dict(teacher_path=str(tmp_path / "no-teacher")))
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*no-teacher: pass a training workdir"):
        train.train_and_evaluate(config, str(tmp_path / "runs" / "fmlm"), log=quiet)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ item 4: a full disk


def test_a_full_disk_during_a_save_is_reported_and_the_previous_step_kept(tmp_path, monkeypatch):
    """Step 4's meta write fails with ENOSPC (in Orbax's background save): the run stops with
    an OSError naming the last complete step, 2, which restores."""
    write_json = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def disk_full(self, item, directory):
        if item.get("step") == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await write_json(self, item, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    config = run_config("flm", model=synthetic_model(n_blocks=1),
                        train=dict(num_steps=6, save_every=2, log_every=2, eval_every=0, sample_every=0))
    workdir = tmp_path / "run"
    with pytest.raises(OSError) as err:
        train.train_and_evaluate(config, str(workdir), log=quiet)
    line = errors.message(err.value)
    assert line.startswith("no space left on device while writing a checkpoint; the last complete "
                           f"checkpoint is step 2 in {workdir}"), line
    assert line.endswith("free disk space or choose another output directory")
    monkeypatch.undo()
    with checkpoints.open_manager(workdir) as manager:
        assert manager.all_steps() == [2]
        assert checkpoints.restore_latest(manager, train.create_train_state(config, jax.random.key(0)),
                                          config=config)[1] == 2


# ------------------------------------------------------------------ kill -9 (slow, subprocesses)

MAIN = [sys.executable, "-m", "fmlm_jax.main", "--config=configs/tiny_flm.py", "--config.model.n_blocks=1",
        "--config.data.batch_size=8", "--config.train.num_steps=16", "--config.train.log_every=1",
        "--config.train.save_every=1", "--config.train.keep_last=2", "--config.train.eval_every=0",
        "--config.train.sample_every=0"]


def losses(workdir):
    """{step: train/loss}, the last row of each step (a resumed run repeats steps)."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def tmp_dirs(workdir):
    return glob.glob(os.path.join(workdir, "*.orbax-checkpoint-tmp*"))


@pytest.mark.slow
def test_kill_9_during_an_async_save_resumes_exactly(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    done = subprocess.run([*MAIN, f"--workdir={full}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    process = subprocess.Popen([*MAIN, f"--workdir={killed}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (os.path.isdir(killed) and tmp_dirs(killed) and any(d.isdigit() for d in os.listdir(killed))):
        assert process.poll() is None and time.monotonic() < deadline, "no save in flight was seen"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)  # during a save: its temporary directory exists
    process.wait()
    assert tmp_dirs(killed)
    again = subprocess.run([*MAIN, f"--workdir={killed}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]
    assert losses(killed) == losses(full)  # bit-identical (JSON floats) at every step
    deadline = time.monotonic() + 10  # Orbax removes the leftover in the background
    while tmp_dirs(killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not tmp_dirs(killed)


@pytest.mark.slow
def test_kill_9_during_conversion_leaves_nothing_or_a_complete_output(run_dir, tmp_path):
    complete = tmp_path / "complete.ckpt"
    assert convert_cli.main(["orbax-to-torch", "--src", str(run_dir), "--out", str(complete)]) == 0
    expected = torch.load(complete, weights_only=True)["state_dict"]
    outcomes = set()
    for delay in (0.5, 1.5, 3.0, 5.0):
        out = tmp_path / f"after-{delay}.ckpt"
        process = subprocess.Popen([sys.executable, "-m", "fmlm_jax.convert", "orbax-to-torch", "--src",
                                    str(run_dir), "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if out.exists():
            written = torch.load(out, weights_only=True)["state_dict"]
            assert written.keys() == expected.keys()
            assert all(torch.equal(written[k], expected[k]) for k in expected)
        outcomes.add(out.exists())
    assert False in outcomes  # at least one kill landed before the rename
