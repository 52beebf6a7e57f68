"""The paper's figure for our runs: gen-PPL and entropy against the number of sampling steps.

`plot_quality_vs_steps(results, path)` takes the results dict of `fmlm_jax.evaluate` (one line
per model, log-scale steps; the data's own values as a dashed reference) and writes a PNG with
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import os


def plot_quality_vs_steps(results: dict, path: str) -> str:
    """Two panels, gen-PPL (log scale) and entropy, against steps (log₂ scale). Returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_ent) = plt.subplots(1, 2, figsize=(10, 4))
    for label, model in results["models"].items():
        rows = sorted(model["rows"], key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        ax_ppl.plot(steps, [r["gen_ppl"] for r in rows], "o-", label=label)
        ax_ent.plot(steps, [r["entropy"] for r in rows], "o-", label=label)
    reference = results.get("reference")
    if reference is not None:
        ax_ppl.axhline(reference["gen_ppl"], color="gray", ls="--", label="data")
        ax_ent.axhline(reference["entropy"], color="gray", ls="--", label="data")
    evaluator = os.path.basename(str(results.get("evaluator", "")))
    ax_ppl.set(yscale="log", xlabel="sampling steps", ylabel=f"gen-PPL ({evaluator})",
               title="Generative perplexity (lower is better)")
    ax_ent.set(xlabel="sampling steps", ylabel="unigram entropy (nats)",
               title="Entropy (data's is the reference)")
    for ax in (ax_ppl, ax_ent):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
