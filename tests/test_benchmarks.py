"""The accelerator benchmarks of issue #16 at tiny shapes: benchmarks/memory.py (XLA's compiled
memory analysis, nothing runs) and benchmarks/device.py (the prepared GPU/TPU run, --tiny)."""

import importlib.util
import json
import os

import pytest
from conftest import ROOT

from fmlm_jax import kernels


def _module(name: str):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MEMORY_KEYS = {"owt_psd_peak_gb", "owt_psd_max_batch_80gb", "owt_psd_peak_gb_before", "owt_flm_peak_gb",
               "owt_lsd_peak_gb", "owt_esd_peak_gb"}


def test_memory_benchmark_writes_its_json_line(capsys):
    # One compile (the tiny FLM step): the last line holds every key, rows not run as null.
    out = _module("memory").main(["--tiny", "--batch", "4", "--rows", "flm_dense"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert MEMORY_KEYS <= set(last) and last["tiny"] is True and last["owt_psd_peak_gb"] is None
    assert last["owt_flm_peak_gb"] > 0 and last["owt_flm_max_batch_80gb"] > 0
    assert out["peak_bytes"]["flm_dense"] == pytest.approx(last["owt_flm_peak_gb"] * 1e9, abs=1e6)


@pytest.mark.slow  # two compiles of a tiny PSD train step (~10 s on 2 busy cores)
def test_memory_benchmark_chunked_psd_peaks_below_the_unchunked_one(capsys):
    # 4 rows × 32 positions, 16 tokens a chunk: the unchunked PSD step holds every (B, L, K)
    # target and probability tensor at once, the chunked one a (16, K) slice of each.
    out = _module("memory").main(["--tiny", "--batch", "4", "--chunk", "16", "--rows", "psd_before,psd"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert MEMORY_KEYS <= set(last) and last["tiny"] is True
    assert last["owt_psd_peak_gb"] is not None and last["owt_flm_peak_gb"] is None  # rows not asked for
    peaks = out["peak_bytes"]
    assert 0 < peaks["psd"] < peaks["psd_before"]
    assert last["owt_psd_max_batch_80gb"] >= last["owt_psd_max_batch_80gb_before"] > 0


@pytest.mark.slow  # six compiles of tiny train steps (~30 s on 2 busy cores)
def test_memory_benchmark_every_row_at_a_tiny_shape(capsys):
    out = _module("memory").main(["--tiny", "--batch", "4", "--chunk", "16"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(isinstance(last[k], (int, float)) and last[k] > 0 for k in MEMORY_KEYS), last
    peaks = out["peak_bytes"]
    assert peaks["psd"] < peaks["psd_before"]
    assert set(peaks) == {"psd_before", "psd", "lsd", "esd", "flm_dense", "flm_projected"}


def test_memory_benchmark_max_batch_is_the_linear_extrapolation():
    max_batch = _module("memory").max_batch
    gb = 1e9
    # fixed 10 GB, 2 GB per sequence: (80 − 10)/2 = 35 sequences.
    assert max_batch(42 * gb, 16, 10 * gb, 80 * gb) == 35
    assert max_batch(90 * gb, 16, 10 * gb, 80 * gb) == 14


def _device_run(tmp_path, *extra):
    out_dir = tmp_path / "device"
    results = _module("device").main(["--out", str(out_dir), "--tiny", "--steps", "1", *extra])
    with open(out_dir / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps(results))  # what it measured is on disk
    with open(out_dir / "compiled.json") as f:
        compiled = json.load(f)
    return results, compiled, out_dir


def test_device_benchmark_tiny_runs_on_cpu(tmp_path):
    # A representative subset in seconds: kernel parity and one FLM step (the rest: slow).
    impls = ["xla"] + (["xla_chunked"] if "xla_chunked" in kernels.available() else [])
    results, compiled, _ = _device_run(tmp_path, "--impls", ",".join(impls), "--no-trace", "--only",
                                       "parity,flm_step_lm1b_xla_dense")
    assert results["platform"] == "cpu" and results["tiny"] is True and results["attention_impls"] == impls
    step = results["flm_step_lm1b_xla_dense"]
    assert "error" not in step and step["step_s"] > 0 and step["tokens_per_s"] > 0
    assert step["model_tflops_per_step"] > 0 and step["mfu"] is None  # no peak FLOP/s for a CPU
    assert compiled["flm_step_lm1b_xla_dense"]["flops"] > 0
    assert compiled["flm_step_lm1b_xla_dense"]["peak_bytes"] > 0
    if "xla_chunked" in impls:
        parity = results["parity_xla_chunked"]
        assert parity["forward_max_abs"] <= 1e-5 and parity["grad_max_abs"] <= 1e-5
    assert not any(k.startswith("psd") for k in results)  # --only


@pytest.mark.slow  # every item of the tiny run (~100 s on 2 busy cores)
def test_device_benchmark_tiny_runs_every_item(tmp_path):
    results, compiled, out_dir = _device_run(tmp_path)
    errors = {k: v for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert not errors and not results["skipped"]
    impl = results["attention_impls"][0]
    for name in (f"flm_step_owt_{impl}_dense", f"flm_step_lm1b_{impl}_projected",
                 f"psd_step_owt_{impl}_dense", f"fmlm_1step_lm1b_b4_{impl}_projected",
                 f"flm_8step_lm1b_b1_{impl}_dense"):
        assert name in results, name
    assert os.path.isdir(out_dir / "trace")
    sample = results[f"fmlm_1step_lm1b_b1_{impl}_dense"]
    assert sample["batch"] == 1 and sample["steps"] == 1 and sample["seconds"] > 0
    assert compiled[f"psd_step_owt_{impl}_dense"]["peak_bytes"] > 0
