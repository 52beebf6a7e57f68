"""The sample / evaluate CLI end to end on a tiny model, scored by a tiny GPT-2 built here.

Nothing is downloaded: the model's tokenizer and the evaluator's are byte-level BPEs trained
on a few sentences, the evaluator a randomly initialised 2-layer GPT-2 saved to tmp_path.
"""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmlm_jax import convert, evaluate, evaluation, sampling  # noqa: E402
from fmlm_jax import model as model_lib  # noqa: E402
from fmlm_jax.data import shakespeare, tokenizers  # noqa: E402

SENTENCES = [
    "When shall we three meet again in thunder, lightning, or in rain?",
    "Fair is foul, and foul is fair: hover through the fog and filthy air.",
    "What bloody man is that? He can report, as seemeth by his plight.",
    "So foul and fair a day I have not seen.",
]
SEQ_LEN = 8


def make_tiny_evaluator(path, vocab_size: int = 300) -> str:
    """A byte-level BPE tokenizer (EOS <|endoftext|>) + a random 2-layer GPT-2, saved to `path`."""
    tok = shakespeare.train_tokenizer(SENTENCES * 2 + ["Horatio, thou art a scholar."], vocab_size)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.GPT2LMHeadModel(config)
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(evaluator dir, model tokenizer dir, FLM checkpoint dir, FMLM checkpoint dir)."""
    root = tmp_path_factory.mktemp("cli")
    evaluator = make_tiny_evaluator(root / "evaluator")
    tok = shakespeare.train_tokenizer(SENTENCES, 280)
    tok.save_pretrained(root / "tokenizer")
    checkpoints = []
    for name, two_time in (("flm", False), ("fmlm", True)):
        cfg = model_lib.model_config("tiny", vocab_size=len(tok), hidden_size=32, cond_dim=32, n_blocks=1,
                                     n_heads=2, dropout=0.0, two_time=two_time)
        params = model_lib.init_params(cfg, jax.random.key(1))
        # random matrices, scaled by 1/√fan-in (the zero-initialised output layer would emit one token)
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        noisy = [np.asarray(jax.random.normal(k, x.shape) / np.sqrt(x.shape[0])) if x.ndim == 2
                 else np.asarray(x)
                 for k, x in zip(keys, leaves, strict=True)]
        params = jax.tree_util.tree_unflatten(tree, noisy)
        convert.save_orbax(root / name, None, params, cfg)
        checkpoints.append(str(root / name))
    return evaluator, str(root / "tokenizer"), *checkpoints


def common(checkpoint, tokenizer, out, *extra):
    return ["--checkpoint", checkpoint, "--tokenizer", tokenizer, "--seq-len", str(SEQ_LEN),
            "--num-samples", "3", "--batch-size", "2", "--out", str(out), *extra]


def test_evaluate_end_to_end(assets, tmp_path):
    evaluator, tok_dir, flm_dir, _ = assets
    printed = []
    assert evaluate.main(["evaluate", *common(flm_dir, tok_dir, tmp_path, "--steps", "1,2"),
                          "--evaluator", evaluator], log=printed.append) == 0
    results = json.load(open(tmp_path / "results.json"))
    model = results["models"]["FLM"]
    assert model["sampler"] == "flm" and [r["steps"] for r in model["rows"]] == [1, 2]
    tok = tokenizers.load_tokenizer(tok_dir)
    params, cfg = evaluate.load_model(flm_dir)
    k_noise, _ = jax.random.split(jax.random.key(0))
    for row in model["rows"]:
        ids = np.asarray(row["token_ids"])
        assert ids.shape == (3, SEQ_LEN)
        # the documented noise: batch b starts from normal(fold_in(k_noise, b)), batches of 2, cut to 3
        z0 = [jax.random.normal(jax.random.fold_in(k_noise, b), (2, SEQ_LEN, cfg.vocab_size)) for b in (0, 1)]
        expected = np.concatenate([np.asarray(sampling.flm_sample(params, cfg, z, row["steps"])) for z in z0])
        np.testing.assert_array_equal(ids, expected[:3])
        assert row["texts"] == evaluation.decode_keep_special(tok, ids)
        assert row["entropy"] == pytest.approx(evaluation.unigram_entropy(ids).mean(), rel=1e-12)
        direct = evaluation.gen_ppl(row["texts"], evaluator=evaluator, max_length=SEQ_LEN)
        assert row["gen_ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
        assert row["num_tokens"] == direct["num_tokens"]
        assert row["samples_per_s"] > 0 and row["eval_seconds"] > 0
    assert open(tmp_path / "gen_ppl.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = "\n".join(printed)
    assert "| FLM | 1 |" in table and "| FLM | 2 |" in table


def test_sample_then_evaluate_the_samples_file(assets, tmp_path):
    evaluator, tok_dir, _, fmlm_dir = assets
    for out, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        evaluate.main(["sample", *common(fmlm_dir, tok_dir, tmp_path / out, "--steps", "2", "--gamma", "0.8",
                                         "--seed", seed)], log=lambda *_: None)
    a, b, c = (json.load(open(tmp_path / d / "samples.json")) for d in "abc")
    ids = [np.asarray(x["models"]["FMLM"]["rows"][0]["token_ids"]) for x in (a, b, c)]
    assert a["models"]["FMLM"]["sampler"] == "fmlm" and a["models"]["FMLM"]["gamma"] == 0.8
    np.testing.assert_array_equal(ids[0], ids[1])  # same seed, same samples
    assert not np.array_equal(ids[0], ids[2])
    first = a["models"]["FMLM"]["rows"][0]
    assert "gen_ppl" not in first and len(first["texts"]) == 3

    evaluate.main(["evaluate", "--samples", str(tmp_path / "a" / "samples.json"), "--evaluator", evaluator,
                   "--out", str(tmp_path / "scored")], log=lambda *_: None)
    row = json.load(open(tmp_path / "scored" / "results.json"))["models"]["FMLM"]["rows"][0]
    direct = evaluation.gen_ppl(row["texts"], evaluator=evaluator, max_length=SEQ_LEN)
    assert row["gen_ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
    assert os.path.isfile(tmp_path / "scored" / "gen_ppl.png")


def test_errors(assets, tmp_path):
    _, tok_dir, flm_dir, _ = assets
    params, cfg = evaluate.load_model(flm_dir)
    with pytest.raises(ValueError, match="FMLM"):
        evaluate.sample(params, cfg, [1], 2, SEQ_LEN, gamma=0.5)
    with pytest.raises(SystemExit, match="--seq-len"):  # a converted directory records no run config
        evaluate.main(["sample", "--checkpoint", flm_dir, "--tokenizer", tok_dir, "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        evaluate.main(["sample", *common(flm_dir, tok_dir, tmp_path, "--steps", "1,x")])
    (tmp_path / "weights.txt").write_text("")
    with pytest.raises(ValueError, match="reference checkpoint"):
        evaluate.load_model(str(tmp_path / "weights.txt"))
