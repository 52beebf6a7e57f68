"""Figures of a run: quality against sampling steps (the paper's figure), and training loss curves.

    plot_quality_vs_steps(results, path)   gen-PPL and entropy against steps, one line per model,
                                           the data's values dashed (results of fmlm_jax.evaluate)
    plot_loss_curves(curves, path)         training loss against step and against seconds, one
                                           line per stage ({"FLM": {"step", "seconds", "loss"}})

PNG files through matplotlib's object API with the Agg canvas: no display, and no change to
the process's pyplot backend.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_quality_vs_steps(results: dict, path: str) -> str:
    """Two panels, gen-PPL (log scale) and entropy, against steps (log₂ scale). Returns path."""
    fig = Figure(figsize=(10, 4))
    ax_ppl, ax_ent = fig.subplots(1, 2)
    for label, model in results["models"].items():
        rows = sorted((r for r in model["rows"] if "gen_ppl" in r), key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        ax_ppl.plot(steps, [r["gen_ppl"] for r in rows], "o-", label=label)
        ax_ent.plot(steps, [r["entropy"] for r in rows], "o-", label=label)
    reference = results.get("reference")
    if reference is not None and "gen_ppl" in reference:
        ax_ppl.axhline(reference["gen_ppl"], color="gray", ls="--", label="data")
        ax_ent.axhline(reference["entropy"], color="gray", ls="--", label="data")
    evaluator = os.path.basename(str(results.get("evaluator", "")))
    ax_ppl.set(yscale="log", xlabel="sampling steps", ylabel=f"gen-PPL ({evaluator})",
               title="Generative perplexity (lower is better)")
    ax_ent.set(xlabel="sampling steps", ylabel="unigram entropy (nats)",
               title="Entropy (data's is the reference)")
    for ax in (ax_ppl, ax_ent):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return _save(fig, path)


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average over `window` points (shorter at the start)."""
    values = np.asarray(values, np.float64)
    if window <= 1 or values.size == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    lo = np.maximum(np.arange(1, values.size + 1) - window, 0)
    return (sums[1:] - sums[lo]) / (np.arange(1, values.size + 1) - lo)


def plot_loss_curves(curves: dict, path: str, window: int = 4) -> str:
    """One row per stage: training loss against step (left) and against training seconds
    (right); raw values faint, a moving average of `window` logged points bold. Returns path.

    curves: {stage label: {"step": [...], "seconds": [...], "loss": [...]}} (stages without
    points are skipped)."""
    stages = [(label, c) for label, c in curves.items() if c.get("loss")]
    fig = Figure(figsize=(10, 3.2 * max(len(stages), 1)))
    axes = np.atleast_2d(fig.subplots(max(len(stages), 1), 2, squeeze=False))
    for (label, c), (ax_step, ax_time) in zip(stages, axes, strict=False):
        for ax, x, unit in ((ax_step, c["step"], "step"), (ax_time, c["seconds"], "seconds")):
            line, = ax.plot(x, c["loss"], alpha=0.3)
            ax.plot(x, smooth(c["loss"], window), color=line.get_color(), lw=2, label=label)
            ax.set(xlabel=f"training {unit}", ylabel="training loss (nats)",
                   title=f"{label}: loss against {unit}")
            ax.grid(True, alpha=0.3)
            ax.legend()
    return _save(fig, path)
