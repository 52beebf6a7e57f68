"""Gen-PPL evaluator speed, side by side: the torch backend (transformers' GPT-2) and the JAX
backend (the Flax GPT-2 of fmlm_jax.textmodels, jitted) on the same samples (SPEC §8).

The evaluator is a GPT-2 of gpt2-small's shape (12 layers, width 768, vocabulary 50257,
1024 positions; `--tiny`: 2 layers, width 64, vocabulary 1000) with random weights, built
with transformers and saved to a temporary directory with a word-level tokenizer (one word,
one token): nothing is downloaded. The samples are random words drawn from a Zipf law, a
quarter of them with an EOS inside, `--length` words each, scored with max_length = length
and the default chunk (1024).

Each backend runs in its own child process, one after the other, so that neither's memory
and thread pool weigh on the other (as benchmarks/speed.py). A child loads its evaluator
(load time reported apart), scores the samples once to warm up (the JAX scorer compiles
then; its compile time, from JAX's compile events, is reported apart), then `--repeats`
timed times. tokens/s = scored tokens (gen_ppl's num_tokens) / median seconds of one call
(tokenization + scoring). The last line is one JSON object:
{"torch_tokens_per_s", "jax_tokens_per_s", "jax_over_torch", "max_rel_diff_ppl", ...}

python benchmarks/evaluator.py [--tiny] [--samples 64] [--length 128] [--batch 8] [--repeats 2]
                               [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from fmlm_jax.evaluation import gen_ppl as gen_ppl_lib
from fmlm_jax.evaluation import jax_evaluator

EOS = "<|endoftext|>"
BACKENDS = ("torch", "jax")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # GPT-2 config fields
    "small": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    "tiny": dict(vocab_size=1000, n_positions=256, n_embd=64, n_layer=2, n_head=2),
}


def words(vocab_size: int) -> list[str]:
    """The tokenizer's vocabulary: EOS (id 0) and vocab_size − 1 words."""
    return [EOS] + [f"w{i}" for i in range(1, vocab_size)]


def build_evaluator(path: str, shape: dict, seed: int = 0) -> str:
    """A random GPT-2 of `shape` and its word-level tokenizer (EOS = id 0), saved to `path`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(words(shape["vocab_size"]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sample_texts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[str]:
    """`num` texts of `length` words drawn from a Zipf law over the vocabulary; a quarter of
    them hold an EOS at a random position (the first-EOS rule is exercised)."""
    rng = np.random.default_rng(seed)
    vocab = words(vocab_size)
    ids = np.minimum(rng.zipf(1.2, size=(num, length)), vocab_size - 1)
    texts = []
    for b, row in enumerate(ids):
        row = [vocab[i] for i in row]
        if b % 4 == 0:
            row[rng.integers(1, length)] = EOS
        texts.append(" ".join(row))
    return texts


COMPILE_EVENTS: list[float] = []  # seconds of JAX's tracing, lowering and XLA compilation


def record_compile(name: str, seconds: float, **_) -> None:
    """A jax.monitoring listener: keeps the durations of the compile events."""
    if name.startswith("/jax/core/compile/"):
        COMPILE_EVENTS.append(seconds)


def score(texts: list[str], evaluator: str, backend: str, batch_size: int, dtype: str) -> dict:
    length = max(len(t.split()) for t in texts)
    return gen_ppl_lib.gen_ppl(texts, evaluator=evaluator, max_length=length, batch_size=batch_size,
                               dtype=dtype, backend=backend)


def run_backend(texts: list[str], evaluator: str, backend: str, batch_size: int, dtype: str,
                repeats: int) -> dict:
    """In a child process: loads the evaluator (as gen_ppl does, so it is cached), scores
    `texts` once to warm up (the JAX scorer compiles then), then `repeats` timed times.
    compile_s: JAX's trace, lowering and XLA compile events during the warm-up call."""
    jax.monitoring.register_event_duration_secs_listener(record_compile)
    start = time.perf_counter()
    if backend == "torch":
        import torch

        gen_ppl_lib.load_evaluator(evaluator, "cuda" if torch.cuda.is_available() else "cpu", dtype)
    else:
        jax_evaluator.load_evaluator(*gen_ppl_lib.resolve_evaluator(evaluator), dtype, evaluator)
    load_seconds = time.perf_counter() - start
    COMPILE_EVENTS.clear()
    first = score(texts, evaluator, backend, batch_size, dtype)
    compile_seconds = sum(COMPILE_EVENTS)
    times = [score(texts, evaluator, backend, batch_size, dtype)["seconds"] for _ in range(repeats)]
    seconds = statistics.median(times)
    return {"ppl": first["ppl"], "sample_nll": first["sample_nll"].tolist(),
            "num_tokens": first["num_tokens"], "load_s": load_seconds, "first_call_s": first["seconds"],
            "compile_s": compile_seconds,
            "times_s": times, "seconds": seconds, "tokens_per_s": first["num_tokens"] / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-64 evaluator (seconds)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="gen_ppl batch_size (rows per forward pass)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)  # child: one backend
    parser.add_argument("--evaluator", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = SHAPES["tiny" if args.tiny else "small"]
    texts = sample_texts(args.samples, args.length, shape["vocab_size"])
    if args.backend:
        result = run_backend(texts, args.evaluator, args.backend, args.batch, args.dtype, args.repeats)
        print(json.dumps(result))
        return

    import torch

    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        evaluator = build_evaluator(os.path.join(tmp, "evaluator"), shape)
        print(f"evaluator {shape} built in {time.perf_counter() - start:.1f} s; torch threads "
              f"{torch.get_num_threads()}, jax devices {jax.devices()}; {args.samples} samples × "
              f"{args.length} tokens, batch {args.batch}, {args.dtype}", flush=True)
        for backend in BACKENDS:
            cmd = [sys.executable, __file__, "--backend", backend, "--evaluator", evaluator,
                   "--samples", str(args.samples), "--length", str(args.length), "--batch", str(args.batch),
                   "--repeats", str(args.repeats), "--dtype", args.dtype] + (["--tiny"] if args.tiny else [])
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"backend {backend} failed:\n{out.stderr[-3000:]}")
            r = results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
            runs = ", ".join(f"{t:.2f}" for t in r["times_s"])
            print(f"{backend:>5}: {r['tokens_per_s']:9.0f} tokens/s ({r['num_tokens']} tokens in "
                  f"{r['seconds']:.2f} s, median of {runs}); load {r['load_s']:.1f} s, first call "
                  f"{r['first_call_s']:.1f} s of which compile {r['compile_s']:.1f} s; ppl {r['ppl']:.4f}",
                  flush=True)
    torch_r, jax_r = results["torch"], results["jax"]
    torch_nll, jax_nll = np.asarray(torch_r["sample_nll"]), np.asarray(jax_r["sample_nll"])
    print(json.dumps({
        "torch_tokens_per_s": round(torch_r["tokens_per_s"], 1),
        "jax_tokens_per_s": round(jax_r["tokens_per_s"], 1),
        "jax_over_torch": round(jax_r["tokens_per_s"] / torch_r["tokens_per_s"], 3),
        "max_rel_diff_ppl": abs(jax_r["ppl"] - torch_r["ppl"]) / torch_r["ppl"],
        "max_rel_diff_sample_nll": float(np.max(np.abs(jax_nll - torch_nll) / torch_nll)),
        "jax_compile_s": round(jax_r["compile_s"], 2),
        "torch_load_s": round(torch_r["load_s"], 2),
        "jax_load_s": round(jax_r["load_s"], 2),
        "shape": "tiny" if args.tiny else "gpt2-small",
        "samples": args.samples, "length": args.length, "batch": args.batch, "dtype": args.dtype,
        "device": jax.default_backend(),
    }))


if __name__ == "__main__":
    main()
