"""Dense vs projected noise (SPEC §10) in training: validation loss and the rows of E, several seeds.

The projected path's gradient into the input matrix E is the conditional expectation of the
dense one: unbiased, but without the noise that the dense path puts on the rows of tokens the
batch does not contain. Under AdamW and the global-norm clip that can change the dynamics.
This trains each configuration with both paths on the same data order (per seed), then reads
every checkpoint back and evaluates, with the *dense* loss on fixed held-out batches, times and
noise (so all runs are compared on the same numbers), the EMA weights' validation loss; it
also records the mean row norm of E for tokens that never occur in the training data and for
those that do.

    python benchmarks/projected_ab.py --out runs/projected_ab [--seeds 0,1,2] [--only demo,synthetic]

Configurations: `demo` = configs/shakespeare_flm.py (K = 1024 BPE, d = 128, 600 steps) on the
embedded Shakespeare corpus; `synthetic` = configs/tiny_flm.py (synthetic phrases) with the vocabulary padded
to K = 256 (ids ≥ 41 never occur; the projection needs K ≥ d = 64). Writes OUT/results.json and
OUT/projected_ab.png; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fmlm_jax import checkpoints, demo, train
from fmlm_jax.data import loader, pipeline
from fmlm_jax.objectives import flm

SYNTHETIC_VOCAB = 256
EVAL_BATCHES = 8


def configs(out: str, only: list[str]) -> dict:
    result = {}
    if "demo" in only:
        c = demo.load_config("shakespeare_flm")
        tok_dir = demo.prepare_corpus(c.data, c.model, os.path.join(out, "corpus"), log=print)
        c.data.dir, c.data.tokenizer = os.path.join(out, "corpus", "data"), tok_dir
        c.train.update(save_every=50, keep_last=100, log_every=100)
        result["demo"] = c
    if "synthetic" in only:
        c = demo.load_config("tiny_flm")
        c.model.vocab_size = SYNTHETIC_VOCAB
        c.train.update(save_every=100, keep_last=100, log_every=200)
        result["synthetic"] = c
    return result


def validation_batches(config) -> list[dict]:
    """Fixed held-out batches: the prepared validation split, or a synthetic stream of its own."""
    c = config.copy_and_resolve_references()
    c.seed = 12345  # a data stream no training run sees
    it = loader.make_iterator(c, "validation")
    return [next(it) for _ in range(EVAL_BATCHES)]


def token_counts(config) -> np.ndarray:
    """How often each token id occurs in (a large sample of) the training data."""
    counts = np.zeros(config.model.vocab_size, np.int64)
    if config.data.source == "prepared":
        ds = pipeline.make_dataset(config.data.dir, "train", config.data.seq_len, 256, shuffle=False,
                                   num_epochs=1, drop_remainder=False)
        for i in range(len(ds)):
            counts += np.bincount(ds[i]["tokens"].ravel(), minlength=len(counts))
    else:
        it = loader.make_iterator(config, "train")
        for _ in range(200):
            counts += np.bincount(next(it)["tokens"].ravel(), minlength=len(counts))
    return counts


def evaluate_run(workdir: str, config, batches: list[dict], unused: np.ndarray) -> list[dict]:
    dense = config.copy_and_resolve_references()
    dense.flm.projected_noise = False
    loss = jax.jit(lambda p, b, k: flm.flm_loss(p, b, k, dense, train=False)[0])
    rows = []
    manager = checkpoints.open_manager(workdir, read_only=True)
    steps = sorted(manager.all_steps())
    manager.close()
    for step in steps:
        params, _, _ = checkpoints.load(os.path.join(workdir, str(step)), weights="ema")
        params = jax.tree_util.tree_map(jnp.asarray, params)
        val = np.mean([float(loss(params, b, jax.random.key(i))) for i, b in enumerate(batches)])
        raw, _, _ = checkpoints.load(os.path.join(workdir, str(step)), weights="raw")
        norms = np.linalg.norm(np.asarray(raw["vocab_embed"]["embedding"]), axis=1)
        rows.append({"step": step, "val_loss": float(val),
                     "unused_row_norm": float(norms[unused].mean()) if unused.any() else None,
                     "used_row_norm": float(norms[~unused].mean())})
    return rows


def plot(results: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        for path_name, color in (("dense", "C0"), ("projected", "C1")):
            runs = results[name][path_name]
            steps = np.asarray([r["step"] for r in runs[0]["curve"]])
            for row, key in ((0, "val_loss"), (1, "unused_row_norm")):
                values = np.asarray([[r[key] if r[key] is not None else np.nan for r in run["curve"]]
                                     for run in runs], np.float64)
                ax = axes[row][col]
                ax.plot(steps, values.mean(0), color=color, label=f"{path_name} (mean of {len(runs)})")
                ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.25)
                ax.set_xlabel("step")
                ax.set_ylabel({"val_loss": "validation loss (dense, EMA)",
                               "unused_row_norm": "mean ‖E_v‖, tokens absent from training"}[key])
                ax.set_title(name)
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/projected_ab")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", default="demo,synthetic")
    p.add_argument("--steps", type=int, help="override train.num_steps (smoke runs)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name, config in configs(args.out, args.only.split(",")).items():
        counts = token_counts(config)
        unused = counts == 0
        batches = validation_batches(config)
        print(f"{name}: {int(unused.sum())} of {len(counts)} token ids never occur in training", flush=True)
        results[name] = {"unused_tokens": int(unused.sum()), "vocab_size": len(counts)}
        for path_name, projected in (("dense", False), ("projected", True)):
            runs = []
            for seed in seeds:
                c = config.copy_and_resolve_references()
                c.seed, c.flm.projected_noise = seed, projected
                if args.steps:
                    c.train.num_steps = args.steps
                workdir = os.path.join(args.out, f"{name}-{path_name}-{seed}")
                start = time.time()
                train.train_and_evaluate(c, workdir, log=lambda m: None)
                seconds = time.time() - start
                curve = evaluate_run(workdir, c, batches, unused)
                runs.append({"seed": seed, "train_seconds": seconds, "curve": curve})
                last = curve[-1]
                print(f"{name} {path_name} seed {seed}: {seconds:.0f} s, final val {last['val_loss']:.4f}, "
                      f"unused-row norm {last['unused_row_norm']}, used {last['used_row_norm']:.3f}",
                      flush=True)
            results[name][path_name] = runs
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {plot(results, os.path.join(args.out, 'projected_ab.png'))}")
    summary = {name: {path: [run["curve"][-1]["val_loss"] for run in r[path]]
                      for path in ("dense", "projected")} for name, r in results.items()}
    print(json.dumps({"final_val_loss": summary}))


if __name__ == "__main__":
    main()
