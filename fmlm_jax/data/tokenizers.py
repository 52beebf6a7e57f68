"""Tokenizers through `transformers`: from a hub name, a saved directory or raw vocab files.

SPEC §1 / §4.1: LM1B uses bert-base-uncased (K = 30522); OpenWebText uses gpt2 plus one
added `[PAD]` token (K = 50257 + 1 = 50258). `load_tokenizer` accepts

- a hub name (`bert-base-uncased`, `gpt2`), resolved by `AutoTokenizer.from_pretrained`
  (downloads unless the files are in the HF cache);
- a directory written by `save_pretrained` (has `tokenizer.json` or `tokenizer_config.json`);
- a directory of raw vocabulary files: `vocab.txt` (BERT WordPiece, lower-cased) or
  `encoder.json` + `vocab.bpe` / `vocab.json` + `merges.txt` (GPT-2 byte-level BPE).

transformers 5 builds the raw-file tokenizers with `vocab=` / `merges=`; the old
`vocab_file=` keywords are silently ignored there and yield an empty tokenizer, which is
why `expected_size` is checked after loading.
"""

from __future__ import annotations

import os

import numpy as np

from fmlm_jax.data import synthetic

# The vocabulary sizes of SPEC §1.
BERT_BASE_UNCASED_SIZE = 30522
GPT2_SIZE = 50257
GPT2_WITH_PAD_SIZE = 50258
PAD_TOKEN = "[PAD]"


def _from_raw_files(path: str):
    from transformers import BertTokenizer, GPT2Tokenizer

    def has(name):
        return os.path.isfile(os.path.join(path, name))

    if has("vocab.txt"):
        return BertTokenizer(vocab=os.path.join(path, "vocab.txt"), do_lower_case=True)
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if has(vocab) and has(merges):
            return GPT2Tokenizer(vocab=os.path.join(path, vocab), merges=os.path.join(path, merges))
    return None


def load_tokenizer(name_or_path: str, add_pad: bool = False, expected_size: int | None = None):
    """Loads a tokenizer (see the module docstring for what `name_or_path` may be).

    add_pad: add `[PAD]` as the pad token if the tokenizer has none (OWT: gpt2 → 50258).
    expected_size: if given, `len(tokenizer)` must equal it (catches empty tokenizers and
    a wrong tokenizer for the dataset).
    """
    tokenizer = None
    if os.path.isdir(name_or_path):
        saved = any(
            os.path.isfile(os.path.join(name_or_path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
        )
        if not saved:
            tokenizer = _from_raw_files(name_or_path)
            if tokenizer is None:
                raise ValueError(
                    f"tokenizer directory {name_or_path!r} has neither a saved tokenizer "
                    "(tokenizer.json / tokenizer_config.json) nor raw vocabulary files "
                    "(vocab.txt; encoder.json + vocab.bpe; vocab.json + merges.txt)"
                )
    elif os.path.sep in name_or_path and not os.path.exists(name_or_path) and name_or_path.startswith(
        (".", os.path.sep)
    ):
        raise FileNotFoundError(f"tokenizer directory {name_or_path!r} does not exist")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if add_pad and tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if expected_size is not None and len(tokenizer) != expected_size:
        raise ValueError(
            f"tokenizer {name_or_path!r} has {len(tokenizer)} tokens but {expected_size} were expected "
            f"(bert-base-uncased: {BERT_BASE_UNCASED_SIZE}; gpt2 + [PAD]: {GPT2_WITH_PAD_SIZE}); "
            "check the tokenizer name or directory"
        )
    return tokenizer


def load_model_tokenizer(name_or_path: str, vocab_size: int):
    """The tokenizer of a model with `vocab_size` outputs (K): `load_tokenizer`, plus the
    `[PAD]` that the OpenWebText models add to gpt2 (SPEC §1: 50257 + 1) when the tokenizer
    has no pad token and is exactly one token short. Any other size mismatch is an error.
    'synthetic-words' is the word tokenizer of the built-in synthetic phrases."""
    if name_or_path == synthetic.TOKENIZER_NAME:
        tokenizer = synthetic.WordTokenizer()
        if len(tokenizer) != vocab_size:
            raise ValueError(f"the synthetic word tokenizer has {len(tokenizer)} tokens but the model has "
                             f"vocab_size {vocab_size}")
        return tokenizer
    tokenizer = load_tokenizer(name_or_path)
    if len(tokenizer) == vocab_size - 1 and tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"tokenizer {name_or_path!r} has {len(tokenizer)} tokens but the model has vocab_size "
            f"{vocab_size}; pass the tokenizer the model was trained with (bert-base-uncased: "
            f"{BERT_BASE_UNCASED_SIZE}; gpt2 + [PAD]: {GPT2_WITH_PAD_SIZE})")
    return tokenizer


# transformers 4.x cleaned up tokenization spaces when decoding (BertTokenizer by default,
# and every tokenizer through the base class); transformers 5 does not, and refuses to for
# byte-level BPE. The reference decodes its samples with 4.57.3 (SPEC §4.1, §8), so these
# rules, in this order, are applied to every decoded text here, whatever the version.
HISTORICAL_CLEANUP = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """transformers 4.x `clean_up_tokenization`: "do n ' t go , ok ." → "don't go, ok."."""
    for old, new in HISTORICAL_CLEANUP:
        text = text.replace(old, new)
    return text


def decode(tokenizer, token_ids) -> list[str]:
    """Texts of (B, L) token ids of the *model's* tokenizer, as the reference produces them
    for scoring and display (SPEC §8): special tokens kept ([CLS], [SEP], <|endoftext|>,
    [PAD]) and tokenization spaces cleaned up as transformers 4.x did."""
    ids = np.asarray(token_ids).tolist()
    texts = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return [clean_up_tokenization(text) for text in texts]


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the wrapper adds BOS/EOS itself)."""
    if not texts:
        return []
    return tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]
