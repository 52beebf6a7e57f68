"""fmlm_jax.rewards: keyword rewards by hand, the in-project soft classifier, the pretrained
text-model rewards against transformers' PyTorch models, and the CLI's --reward parsing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from fmlm_jax import rewards

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_keyword_reward_by_hand():
    p = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 4, 9)), axis=-1)
    mass = np.asarray(p)[..., [2, 5]].sum(-1)  # (B, L)
    per_position = np.log(mass + rewards.KEYWORD_FLOOR)
    smooth = rewards.keyword([5, 2, 2], 9)(p)
    np.testing.assert_allclose(smooth, np.log(np.exp(per_position).sum(-1)), rtol=1e-5)
    summed = rewards.keyword([2, 5], 9, smooth_max=False)(p)
    np.testing.assert_allclose(summed, per_position.sum(-1), rtol=1e-5)
    with pytest.raises(ValueError, match=r"subset of \[0, 9\)"):
        rewards.keyword([9], 9)


def test_keyword_token_ids_are_the_whole_word_tokens_and_split_words_are_refused():
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe())
    ids = rewards.keyword_token_ids(["love"], tok)
    single = {tok(f, add_special_tokens=False)["input_ids"][0] for f in ("love", " love", "Love", " Love")
              if len(tok(f, add_special_tokens=False)["input_ids"]) == 1}
    assert ids == sorted(single) and len(ids) >= 2  # "love" and " love" are tokens of this BPE
    assert all(tok.decode([i]).strip().lower() == "love" for i in ids)
    with pytest.raises(ValueError, match=r"splits them.*'quixotic'"):
        rewards.keyword_token_ids(["love", "quixotic"], tok)


def _bpe():
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["love is love and all you need is love", "the night is dark"] * 5
    tok.train_from_iterator(text, trainer=trainer)
    return tok


def test_soft_classifier_learns_saves_and_rewards(tmp_path):
    # Two classes told apart by which half of the vocabulary their tokens come from.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    blocks = np.where(labels[:, None] == 0, rng.integers(0, 10, (400, 6)), rng.integers(10, 20, (400, 6)))
    params, config = rewards.train_classifier(blocks, labels, 20, 2, steps=200)
    assert rewards.classifier_accuracy(params, config, blocks, labels) > 0.95
    config["labels"] = ["low", "high"]
    rewards.save_classifier(str(tmp_path / "c"), params, config)
    loaded, loaded_config = rewards.load_classifier(str(tmp_path / "c"))
    assert loaded_config == config
    p = jax.nn.one_hot(blocks[:8], 20)
    high = rewards.classifier_reward(loaded, loaded_config, 1)(p)
    assert high.shape == (8,) and np.all(np.asarray(high) <= 0.0)
    np.testing.assert_allclose(np.asarray(high) > np.log(0.5), labels[:8] == 1)
    by_name = rewards.parse(f"classifier:{tmp_path / 'c'}:high", None, 20)
    np.testing.assert_allclose(by_name(p), high, rtol=1e-6)
    with pytest.raises(ValueError, match="not one of the classifier's 2 classes"):
        rewards.classifier_reward(loaded, loaded_config, 2)
    with pytest.raises(FileNotFoundError, match="no classifier here"):
        rewards.load_classifier(str(tmp_path / "nope"))


@pytest.mark.slow  # a GPT-2 compile; the text models' parity: tests/test_textmodels.py
def test_gpt2_fluency_of_a_one_hot_sequence_is_minus_its_mean_nll(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path)
    ids = np.random.default_rng(1).integers(0, 30, (3, 7))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(ids)).logits.double(), -1).numpy()
    expected = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0].mean(-1)
    got = rewards.gpt2_fluency(str(tmp_path))(jax.nn.one_hot(ids, 30))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # an OWT model's K = V + 1 ([PAD] last): the pad column is dropped, the result unchanged
    fluency = rewards.gpt2_fluency(str(tmp_path))
    np.testing.assert_allclose(fluency(jax.nn.one_hot(ids, 31)), expected, atol=1e-4)
    with pytest.raises(ValueError, match="reads 30 tokens but the model's samples have K = 32"):
        fluency(jax.nn.one_hot(ids, 32))
    # differentiable in the soft sequence
    grad = jax.grad(lambda p: fluency(p).sum())(jax.nn.one_hot(ids, 30) * 0.9 + 0.1 / 30)
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0


def test_hf_classifier_reward_is_the_torch_models_log_probability(tmp_path):
    torch.manual_seed(0)
    labels = {0: "neg", 1: "neu", 2: "pos"}
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, num_labels=3,
                                     max_position_embeddings=32,
                                     id2label=labels, label2id={v: k for k, v in labels.items()})
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    ids = np.random.default_rng(1).integers(0, 40, (2, 6))
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor(ids)).logits.double(), -1).numpy()[:, 2]
    for label in ("pos", 2, "2"):
        got = rewards.hf_classifier(str(tmp_path), label)(jax.nn.one_hot(ids, 40))
        np.testing.assert_allclose(got, expected, atol=1e-4)
    for label in ("happy", 3):
        with pytest.raises(ValueError, match=r"not one of the classifier's labels \['neg', 'neu', 'pos'\]"):
            rewards.hf_classifier(str(tmp_path), label)


def test_parse_refuses_unknown_specs():
    with pytest.raises(ValueError, match="is not keyword:WORDS"):
        rewards.parse("sentiment", None, 10)
