"""A built-in synthetic corpus with strong token correlations: fixed phrases.

Sequences are random phrases joined by an end-of-phrase token and cut into blocks of
L tokens (wrapped, as SPEC §4.1 wraps real text), so every token but a phrase's first
is determined by its neighbours. A model that learned the data produces only bigrams
that occur in the corpus; `valid_bigram_fraction` measures that.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

PHRASES = (
    "the cat sat on the mat",
    "a dog ran across the park",
    "birds sing at dawn",
    "we eat bread with cheese",
    "rain falls on green hills",
    "she reads an old book",
    "ships sail to distant ports",
    "my friend plays the violin",
    "snow covers quiet streets",
    "children laugh in the garden",
)
SEPARATOR = "<eos>"
TOKENIZER_NAME = "synthetic-words"  # what run configs and `load_model_tokenizer` call WordTokenizer


class WordTokenizer:
    """Word-level tokenizer over the phrase vocabulary; id 0 is the separator."""

    def __init__(self, phrases=PHRASES):
        words = sorted({w for p in phrases for w in p.split()})
        self.vocab = [SEPARATOR, *words]
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        self.separator_id = 0

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in self._ids]
        if unknown:
            raise ValueError(f"words not in the synthetic vocabulary: {unknown}")
        return [self._ids[w] for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def batch_decode(self, sequences, **unused) -> list[str]:
        """`decode` of each sequence (the Hugging Face signature `tokenizers.decode` calls)."""
        return [self.decode(ids) for ids in sequences]


def corpus_bigrams(tokenizer: WordTokenizer, phrases=PHRASES) -> set[tuple[int, int]]:
    """Every adjacent pair that can occur in the wrapped stream."""
    pairs = set()
    encoded = [tokenizer.encode(p) for p in phrases]
    for ids in encoded:
        pairs.update(zip(ids[:-1], ids[1:], strict=False))
        pairs.add((ids[-1], tokenizer.separator_id))
        pairs.update((tokenizer.separator_id, other[0]) for other in encoded)
    return pairs


def valid_bigram_fraction(token_ids: np.ndarray, tokenizer: WordTokenizer) -> float:
    """Fraction of adjacent pairs in (B, L) samples that occur in the corpus."""
    allowed = corpus_bigrams(tokenizer)
    ids = np.asarray(token_ids)
    pairs = zip(ids[:, :-1].ravel().tolist(), ids[:, 1:].ravel().tolist(), strict=False)
    hits = [pair in allowed for pair in pairs]
    return float(np.mean(hits))


def batches(batch_size: int, seq_len: int, seed: int,
            tokenizer: WordTokenizer | None = None) -> Iterator[dict]:
    """Endless {'tokens': (B, L) int32} batches of wrapped random phrases."""
    tokenizer = tokenizer or WordTokenizer()
    encoded = [[*tokenizer.encode(p), tokenizer.separator_id] for p in PHRASES]
    rng = np.random.default_rng(seed)
    buffer: list[int] = []
    while True:
        need = batch_size * seq_len
        while len(buffer) < need:
            buffer.extend(encoded[rng.integers(len(encoded))])
        block, buffer = buffer[:need], buffer[need:]
        yield {"tokens": np.asarray(block, np.int32).reshape(batch_size, seq_len)}


def dataset(batch_size: int, seq_len: int, seed: int, tokenizer: WordTokenizer | None = None):
    """The same corpus as a grain MapDataset of batches: batch i is drawn from the seed
    (seed, i) alone, so the stream is random-access and its iterator checkpointable."""
    import grain

    tokenizer = tokenizer or WordTokenizer()
    encoded = [[*tokenizer.encode(p), tokenizer.separator_id] for p in PHRASES]

    def make_batch(index: int) -> dict:
        rng = np.random.default_rng([seed, int(index)])
        need, block = batch_size * seq_len, []
        while len(block) < need:
            block.extend(encoded[rng.integers(len(encoded))])
        return {"tokens": np.asarray(block[:need], np.int32).reshape(batch_size, seq_len)}

    return grain.MapDataset.range(2**31 - 1).map(make_batch)
