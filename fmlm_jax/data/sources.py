"""Document sources: LM1B (tfds), OpenWebText (HF hub or local files), plain text files.

Every source is an iterable of documents (str) in a fixed order, so preparation is
deterministic. `fmlm_jax.data.prepare` tokenizes, wraps and writes them to ArrayRecord.

- LM1B (SPEC §4.1): tfds `lm1b`, read with `tfds.data_source`, which needs no TensorFlow
  but needs the dataset built in ArrayRecord format
  (`tfds build lm1b --file_format=array_record`, or `prepare` builds it). Each sentence is
  detokenized by `lm1b_detokenize`.
- OpenWebText (SPEC §4.1): the documents of a local directory/file (`.parquet` or
  `.jsonl` with a `text` field, or `.txt` files with one document per file), or the
  parquet files of a HF hub dataset (default `Skylion007/openwebtext`). The split is by
  document position: train = docs[:-100000], validation = docs[-100000:].
- Text files: `.txt` files, one document per line (default) or per file.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator

OWT_VALIDATION_DOCS = 100_000  # SPEC §4.1: train[:-100000] / train[-100000:]
OWT_HUB_DATASET = "Skylion007/openwebtext"

# --- LM1B detokenizer ----------------------------------------------------------------
# LM1B text is tokenized Penn-Treebank style ("He did n't go ( really ) .").
# The reference's `lm1b_detokenizer`, rule for rule and in its order (SPEC §4.1). Nothing
# is added: there is no rule for "n't", so "do n't" stays "do n't" and bert-base-uncased
# tokenizes it as do / n / ' / t, the ids the published models were trained on. Plain
# substrings are str.replace; patterns are regular expressions (Python `re`, Unicode \w).
_LM1B_RULES: tuple[tuple[str, str, str], ...] = (
    ("replace", "http : / / ", "http://"),
    ("replace", "https : / / ", "https://"),
    ("regex", r" '(\w+)", r"'\1"),  # "they 'll" → "they'll" (any word after the quote)
    ("regex", r" (\w+) \. ", r" \1. "),  # "word . " → "word. "
    ("regex", r" (\w+) \.$", r" \1."),  # ... and at the end
    ("replace", " ? ", "? "),
    ("regex", r" \?$", "?"),
    ("replace", " ! ", "! "),
    ("regex", r" !$", "!"),
    ("replace", " , ", ", "),
    ("replace", " : ", ": "),
    ("replace", " ; ", "; "),
    ("replace", " / ", "/"),
    ("regex", r'" ([^"]+) "', r'"\1"'),
    ("regex", r"' ([^']+) '", r"'\1'"),
    ("regex", r"\( ([^()]+) \)", r"(\1)"),
    ("regex", r"\[ ([^\[\]]+) \]", r"[\1]"),
    ("replace", "$ ", "$"),
    ("replace", "£ ", "£"),
)
_LM1B_COMPILED = tuple((kind, re.compile(a) if kind == "regex" else a, b) for kind, a, b in _LM1B_RULES)


def lm1b_detokenize(text: str) -> str:
    """The reference's LM1B detokenizer (SPEC §4.1): "It 's 5 % , see ( this ) ." →
    "It's 5 %, see (this).". Note what it leaves alone: "do n't", "5 %"."""
    for kind, pattern, repl in _LM1B_COMPILED:
        text = pattern.sub(repl, text) if kind == "regex" else text.replace(pattern, repl)
    return text


def _as_str(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if hasattr(x, "item") and not isinstance(x, str):  # numpy scalar / 0-d array
        return _as_str(x.item())
    return str(x)


# --- LM1B ------------------------------------------------------------------------------
def lm1b_documents(split: str, data_dir: str | None = None, download: bool = False,
                   detokenize: bool = True) -> Iterator[str]:
    """LM1B sentences of a tfds split ('train', 'test'), detokenized, in file order.

    Reads the tfds ArrayRecord files in `data_dir` (default ~/tensorflow_datasets) without
    TensorFlow. `download=True` lets tfds download and build them first (network).
    """
    import tensorflow_datasets as tfds

    if download:
        builder = tfds.builder("lm1b", data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
    try:
        source = tfds.data_source("lm1b", split=split, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for a missing/unsuitable build
        raise FileNotFoundError(
            f"could not open tfds lm1b split {split!r} in data_dir={data_dir!r} as ArrayRecord ({e}). "
            "Build it with `tfds build lm1b --file_format=array_record --data_dir=DIR` "
            "or pass --download to `python -m fmlm_jax.data.prepare`."
        ) from e
    n, step = len(source), 1000
    for start in range(0, n, step):
        keys = list(range(start, min(start + step, n)))
        # __getitems__ reads a batch of records at once (tfds ArrayRecord sources have it).
        records = source.__getitems__(keys) if hasattr(source, "__getitems__") else [source[i] for i in keys]
        for record in records:
            text = _as_str(record["text"])
            yield lm1b_detokenize(text) if detokenize else text


# --- local files -----------------------------------------------------------------------
_DOC_EXTENSIONS = (".parquet", ".jsonl", ".json", ".txt")


def list_files(path: str, extensions=_DOC_EXTENSIONS) -> list[str]:
    """Files of `path` (a file, a directory searched recursively, or a glob), sorted."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = [
            os.path.join(root, f)
            for root, _, names in os.walk(path)
            for f in names
            if f.endswith(extensions)
        ]
    else:
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    if not files:
        raise FileNotFoundError(f"no {'/'.join(extensions)} files found at {path!r}")
    return sorted(files)


def text_documents(path: str, per: str = "line") -> Iterator[str]:
    """Documents of `.txt` files: one per non-empty line (`per='line'`) or per file."""
    if per not in ("line", "file"):
        raise ValueError(f"per must be 'line' or 'file', got {per!r}")
    for f in list_files(path, (".txt",)):
        with open(f, encoding="utf-8") as fh:
            if per == "file":
                yield fh.read()
            else:
                for line in fh:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield line


def _file_documents(f: str, field: str) -> Iterator[str]:
    if f.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            yield from batch.column(0).to_pylist()
    elif f.endswith((".jsonl", ".json")):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)[field]
    else:  # .txt: the whole file is one document (the original OWT layout)
        with open(f, encoding="utf-8") as fh:
            yield fh.read()


def _count_file_documents(f: str, field: str) -> int:
    if f.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(f).metadata.num_rows
    if f.endswith((".jsonl", ".json")):
        with open(f, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    return 1


def hub_dataset_files(spec: str = OWT_HUB_DATASET, cache_dir: str | None = None) -> str:
    """Downloads the parquet files of a HF hub dataset `REPO_ID[@REVISION]`; returns their directory.

    Without a revision, tries `main`, then the hub's parquet conversion
    (`refs/convert/parquet`). A partial conversion (the hub converts only the first few GB
    of large datasets) is refused: it would silently shorten the training set.
    """
    from huggingface_hub import snapshot_download

    repo_id, _, revision = spec.partition("@")
    for rev in [revision] if revision else ["main", "refs/convert/parquet"]:
        local = snapshot_download(repo_id, repo_type="dataset", revision=rev,
                                  allow_patterns=["*.parquet"], cache_dir=cache_dir)
        found = glob.glob(os.path.join(local, "**", "*.parquet"), recursive=True)
        if any("partial" in os.path.relpath(f, local) for f in found):
            raise ValueError(
                f"the hub's parquet files of {repo_id}@{rev} are a partial conversion; download the "
                "full dataset files yourself and pass their directory as --input"
            )
        if found:
            return local
    raise FileNotFoundError(f"no parquet files in hub dataset {spec!r}; pass a local directory as --input")


def owt_documents(split: str, path: str, field: str = "text",
                  validation_docs: int = OWT_VALIDATION_DOCS) -> Iterator[str]:
    """OpenWebText documents of `split` ('train' or 'validation') under `path` (SPEC §4.1).

    Files are read in sorted path order; train = docs[:-validation_docs],
    validation = docs[-validation_docs:] (the reference's `train[:-100000]`).
    """
    if split not in ("train", "validation"):
        raise ValueError(f"OpenWebText split must be 'train' or 'validation', got {split!r}")
    files = list_files(path)
    total = sum(_count_file_documents(f, field) for f in files)
    if total <= validation_docs:
        raise ValueError(
            f"{path!r} holds {total} documents, not more than the {validation_docs} validation documents"
        )
    start, stop = (0, total - validation_docs) if split == "train" else (total - validation_docs, total)
    i = 0
    for f in files:
        n = _count_file_documents(f, field)
        if i + n <= start:
            i += n
            continue
        if i >= stop:
            return
        for doc in _file_documents(f, field):
            if start <= i < stop:
                yield doc
            i += 1
            if i >= stop:
                return


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
