"""Preparation: documents → token ids → wrapped blocks of L tokens → ArrayRecord (SPEC §4.1).

Run once per dataset and split; training reads the result with `fmlm_jax.data.pipeline`.

    # LM1B from a tfds ArrayRecord build (add --download to let tfds download and build it)
    python -m fmlm_jax.data.prepare --dataset=lm1b --split=train --seq-len=128 --out=data/lm1b
    python -m fmlm_jax.data.prepare --dataset=lm1b --split=test  --seq-len=128 --out=data/lm1b
    # OpenWebText from local parquet/jsonl/txt files, or the hub (--input=hf://Skylion007/openwebtext[@REV])
    python -m fmlm_jax.data.prepare --dataset=owt --split=train --seq-len=1024 --input=PATH --out=data/owt
    python -m fmlm_jax.data.prepare --dataset=owt --split=validation --seq-len=1024 --input=PATH \
        --out=data/owt
    # plain text files, one document per line (or --per=file), any tokenizer
    python -m fmlm_jax.data.prepare --dataset=text --split=train --seq-len=128 --input=corpus/ \
        --tokenizer=gpt2 --out=data/mytext

Layout: OUT/SPLIT/meta.json and OUT/SPLIT/blocks-NNNNN.array_record; each record is one
block of L token ids (uint16 when K ≤ 65536, else int32), little-endian.

Wrapping (the reference's `group_texts`): each document's ids are followed by the
separator; a chunk of `chunk_docs` (1000) documents is concatenated and cut into blocks
[BOS] + (L−2) ids + [EOS]; the chunk's remainder is dropped. LM1B: BOS = EOS = separator
= [CLS] (101), a quirk of the reference that we keep; OWT: all three are
<|endoftext|> (50256).
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np

from fmlm_jax import atomic, errors
from fmlm_jax.data import sources, tokenizers

FORMAT_VERSION = 1
RECORDS_PER_FILE = 1_000_000
CHUNK_DOCS = 1000

# Per dataset: default tokenizer, add [PAD], expected K, the special-token choice.
DATASETS = {
    "lm1b": dict(tokenizer="bert-base-uncased", add_pad=False, vocab_size=tokenizers.BERT_BASE_UNCASED_SIZE,
                 special="[CLS]", splits=("train", "test")),
    "owt": dict(tokenizer="gpt2", add_pad=True, vocab_size=tokenizers.GPT2_WITH_PAD_SIZE,
                special="<|endoftext|>", splits=("train", "validation")),
    "text": dict(tokenizer=None, add_pad=False, vocab_size=None, special=None, splits=None),
}


def prepare_command(dataset: str = "DATASET", split: str = "SPLIT", seq_len="L", out: str = "OUT") -> str:
    cmd = f"python -m fmlm_jax.data.prepare --dataset={dataset} --split={split} --seq-len={seq_len}"
    inputs = {"owt": "LOCAL_DIR_OR_hf://Skylion007/openwebtext", "text": "TEXT_FILES"}
    if dataset in inputs:
        cmd += f" --input={inputs[dataset]}"
    return cmd + f" --out={out}"


def wrap(token_lists: Iterable[list[int]], seq_len: int, bos: int, eos: int, separator: int,
         chunk_docs: int = CHUNK_DOCS) -> Iterator[np.ndarray]:
    """Wrapped blocks (L,) int64 from tokenized documents (SPEC §4.1, see the module docstring)."""
    if seq_len < 3:
        raise ValueError(f"seq_len must be at least 3 (BOS, one token, EOS), got {seq_len}")
    inner = seq_len - 2
    for chunk in sources.chunked(token_lists, chunk_docs):
        lengths = np.fromiter(map(len, chunk), np.int64, len(chunk))
        flat = np.fromiter(itertools.chain.from_iterable(chunk), np.int64, int(lengths.sum()))
        ids = np.insert(flat, np.cumsum(lengths), separator)  # each document followed by it
        n = len(ids) // inner
        if n == 0:
            continue
        body = ids[: n * inner].reshape(n, inner)
        blocks = np.empty((n, seq_len), np.int64)
        blocks[:, 0] = bos
        blocks[:, 1:-1] = body
        blocks[:, -1] = eos
        yield from blocks


def write_blocks(blocks: Iterable[np.ndarray], out_dir: str, seq_len: int, vocab_size: int,
                 meta: dict, records_per_file: int = RECORDS_PER_FILE) -> dict:
    """Writes blocks to OUT_DIR/blocks-NNNNN.array_record and OUT_DIR/meta.json; returns meta."""
    from array_record.python.array_record_module import ArrayRecordWriter

    dtype = np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<i4")
    os.makedirs(out_dir, exist_ok=True)
    files, num_blocks, writer, in_file = [], 0, None, 0
    try:
        for block in blocks:
            if block.shape != (seq_len,):
                raise ValueError(f"block has shape {block.shape}, expected ({seq_len},)")
            if writer is None or in_file == records_per_file:
                if writer is not None:
                    writer.close()
                name = f"blocks-{len(files):05d}.array_record"
                files.append(name)
                # group_size:1 → every record is individually seekable (random access).
                writer = ArrayRecordWriter(os.path.join(out_dir, name), "group_size:1")
                in_file = 0
            writer.write(block.astype(dtype).tobytes())
            in_file += 1
            num_blocks += 1
    finally:
        if writer is not None:
            writer.close()
    meta = dict(meta, format_version=FORMAT_VERSION, seq_len=seq_len, vocab_size=vocab_size,
                dtype=dtype.str, num_blocks=num_blocks, files=files)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def prepare(dataset: str, split: str, seq_len: int, out: str, tokenizer: str | None = None,
            input_path: str | None = None, tfds_data_dir: str | None = None, download: bool = False,
            per: str = "line", chunk_docs: int = CHUNK_DOCS, max_docs: int | None = None,
            overwrite: bool = False, records_per_file: int = RECORDS_PER_FILE,
            validation_docs: int = sources.OWT_VALIDATION_DOCS, log=None) -> dict:
    """Prepares OUT/SPLIT (see the module docstring); returns its meta.json contents."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    spec = DATASETS[dataset]
    if spec["splits"] and split not in spec["splits"]:
        raise ValueError(f"{dataset} has splits {spec['splits']}, got {split!r}")
    out_dir = os.path.join(out, split)
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is already prepared; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    tokenizer_name = tokenizer or spec["tokenizer"]
    if tokenizer_name is None:
        raise ValueError(f"--tokenizer is required for dataset {dataset!r}")
    tok = tokenizers.load_tokenizer(tokenizer_name, add_pad=spec["add_pad"],
                                    expected_size=spec["vocab_size"])
    vocab_size = len(tok)
    if spec["special"] is not None:
        special = tok.convert_tokens_to_ids(spec["special"])
    else:  # text: the tokenizer's own end-of-text / [CLS] token
        special = tok.eos_token_id if tok.eos_token_id is not None else tok.cls_token_id
        if special is None:
            raise ValueError(f"tokenizer {tokenizer_name!r} has neither an EOS nor a [CLS] token")

    if dataset == "lm1b":
        docs = sources.lm1b_documents(split, tfds_data_dir, download=download)
    elif dataset == "owt":
        if input_path is None:
            raise ValueError("--input is required for owt: a local directory/file or hf://REPO_ID")
        if input_path.startswith("hf://"):
            input_path = sources.hub_dataset_files(input_path[len("hf://"):])
        docs = sources.owt_documents(split, input_path, validation_docs=validation_docs)
    else:
        if input_path is None:
            raise ValueError("--input is required for text: a .txt file, a directory or a glob")
        docs = sources.text_documents(input_path, per=per)
    if max_docs is not None:
        docs = (d for i, d in zip(range(max_docs), docs, strict=False))

    counts = dict(documents=0, tokens=0)
    start = time.time()

    def token_lists():
        for chunk in sources.chunked(docs, chunk_docs):
            ids = tokenizers.encode_batch(tok, chunk)
            counts["documents"] += len(ids)
            counts["tokens"] += sum(map(len, ids))
            if log and counts["documents"] % (100 * chunk_docs) == 0:
                log(f"{counts['documents']} documents, {time.time() - start:.0f} s")
            yield from ids

    blocks = wrap(token_lists(), seq_len, bos=special, eos=special, separator=special, chunk_docs=chunk_docs)
    meta = dict(dataset=dataset, split=split, tokenizer=tokenizer_name, bos=special, eos=special,
                separator=special, chunk_docs=chunk_docs, detokenized=dataset == "lm1b")
    meta = write_blocks(blocks, out_dir, seq_len, vocab_size, meta, records_per_file)
    meta = dict(meta, num_documents=counts["documents"], num_tokens=counts["tokens"])
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def check_arguments(args: dict) -> None:
    """The cheap checks, before a tokenizer loads or a document is read: L, the input, the output."""
    if args["seq_len"] < 3:
        raise ValueError(f"--seq-len must be at least 3 (BOS, one token, EOS), got {args['seq_len']}")
    for name in ("chunk_docs", "max_docs"):
        if args.get(name) is not None and args[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {args[name]}")
    path = args.get("input_path")
    if path and "://" not in path and not any(c in path for c in "*?[") and not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such input file or directory", path)
    atomic.check_writable(os.path.abspath(args["out"]))


def main(argv=None) -> int:
    p = errors.ArgumentParser(prog="python -m fmlm_jax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--split", required=True)
    p.add_argument("--seq-len", type=int, required=True, help="L: 128 for LM1B, 1024 for OWT")
    p.add_argument("--out", required=True, help="output directory; the split goes to OUT/SPLIT")
    p.add_argument("--tokenizer", help="hub name or local directory (default: the dataset's)")
    p.add_argument("--input", dest="input_path", help="owt/text: local file, directory, glob, or hf://REPO")
    p.add_argument("--tfds-data-dir", help="lm1b: tfds data_dir (default ~/tensorflow_datasets)")
    p.add_argument("--download", action="store_true", help="lm1b: let tfds download and build lm1b")
    p.add_argument("--per", default="line", choices=("line", "file"), help="text: one document per ...")
    p.add_argument("--chunk-docs", type=int, default=CHUNK_DOCS)
    p.add_argument("--max-docs", type=int, help="stop after this many documents (smoke tests)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a refusal")
    args = vars(p.parse_args(argv))
    args.pop("verbose")
    check_arguments(args)
    meta = prepare(**args, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({k: v for k, v in meta.items() if k != "files"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
