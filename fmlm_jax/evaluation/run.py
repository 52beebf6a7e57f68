"""The sample/evaluate run: samples per step count, gen-PPL and entropy, results.json and a table.

    rows = sample(params, model_config, steps=(1, 2, 4, 8), num_samples=256, seq_len=128, seed=0, gamma=0.8)
    score(rows, tokenizer, evaluator="gpt2-large", max_length=128)   # adds texts, entropy, gen-PPL
    write_outputs(results, out_dir)                                 # results.json, gen_ppl.png, table

Every step count samples the same initial noise (batch b: z₀ from key(seed) folded with b),
so rows differ only by the number of steps. Samples/s is measured after a warm-up batch that
compiles the sampler, and apart from scoring (whose time is reported separately). The model
picks its sampler (`sampling.generate`): FLM Euler, or the FMLM γ-sampler for two-time models.

results.json: {"models": {label: {"checkpoint", "sampler", "gamma", "tokenizer", "vocab_size",
"rows": [row, ...]}}, "reference": row | null, "evaluator", "seq_len", "num_samples", "seed"};
a row is {"steps", "gen_ppl", "entropy", "nll_sum", "num_tokens", "samples_per_s",
"sample_seconds", "compile_seconds", "eval_seconds", "texts", "token_ids"}.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from fmlm_jax import atomic, sampling
from fmlm_jax.data import synthetic, tokenizers
from fmlm_jax.evaluation import gen_ppl as gen_ppl_lib
from fmlm_jax.evaluation import plots

Log = Callable[[str], None]


def model_tokenizer_name(run_config: dict | None) -> str | None:
    """The model tokenizer a run config names: `data.tokenizer`, else its prepared data's."""
    data = (run_config or {}).get("data") or {}
    if data.get("source") == "synthetic":
        return synthetic.TOKENIZER_NAME
    if data.get("tokenizer"):
        return data["tokenizer"]
    meta_path = os.path.join(data.get("dir") or "", "train", "meta.json")
    if data.get("source") == "prepared" and os.path.isfile(meta_path):
        with open(meta_path) as f:
            return json.load(f).get("tokenizer")
    return None


def model_tokenizer(name: str, model: dict):
    """The model's tokenizer, sized to its vocabulary (gpt2 gains the OWT models' [PAD])."""
    if model.get("vocab_size"):
        return tokenizers.load_model_tokenizer(name, int(model["vocab_size"]))
    return tokenizers.load_tokenizer(name)


# ============================================================================ sampling


def sample(params, model_config, steps: Sequence[int], num_samples: int, seq_len: int, seed: int = 0,
           gamma: float = 0.0, batch_size: int = 64, log: Log = print,
           on_row: Callable[[dict], None] | None = None, guidance: dict | None = None,
           reward: Callable | None = None) -> list[dict]:
    """Samples `num_samples` sequences of `seq_len` tokens for each step count (SPEC §6).

    Returns one row per step count: {"steps", "token_ids" (num_samples, L) int array,
    "sample_seconds", "compile_seconds", "samples_per_s"}. Batches are full (the last is cut
    to num_samples). on_row(row) is called as soon as a step count is done (to save it).
    guidance: `sampling.generate`'s auto / weak_params / reward arguments (SPEC §11), the same
    noise as unguided. reward: a reward (fmlm_jax.rewards) to score the samples' one-hots with:
    the row gains "reward" (mean) and "reward_se" (its standard error).
    """
    if num_samples < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError(f"need num_samples, seq_len, batch_size ≥ 1, got {num_samples}, {seq_len}, "
                         f"{batch_size}")
    if not model_config.two_time and gamma != 0.0:
        raise ValueError(f"gamma={gamma} applies to FMLM (two-time) models only; this checkpoint is an "
                         "FLM (Euler sampler): drop --gamma")
    batch_size = min(batch_size, num_samples)
    num_batches = -(-num_samples // batch_size)
    k_noise, k_gamma = jax.random.split(jax.random.key(seed))
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)

    def run(n: int, b: int) -> jax.Array:
        z0 = sampling.initial_noise(jax.random.fold_in(k_noise, b), batch_size, seq_len, model_config)
        return sampling.generate(params, model_config, z0, n, gamma=gamma, rng=jax.random.fold_in(k_gamma, b),
                                 **(guidance or {}))

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
        if reward is not None:
            rows[-1].update(score_reward(reward, ids, model_config.vocab_size))
        log(f"  {sampling.sampler_name(model_config).upper()} {n:4d} steps: "
            f"{rows[-1]['samples_per_s']:8.1f} samples/s (compile + warm-up {compile_seconds:.1f} s)")
        if on_row is not None:
            on_row(rows[-1])
    return rows


# ============================================================================ scoring


def score(rows: list[dict], tokenizer, evaluator: str, max_length: int, batch_size: int = 8,
          log: Log = print) -> list[dict]:
    """Adds texts, entropy and gen-PPL (SPEC §8) to each row with `token_ids` (in place)."""
    for row in rows:
        ids = np.asarray(row["token_ids"])
        row["texts"] = tokenizers.decode(tokenizer, ids)
        row["entropy"] = float(gen_ppl_lib.unigram_entropy(ids).mean())
        out = gen_ppl_lib.gen_ppl(row["texts"], evaluator=evaluator, max_length=max_length,
                                  batch_size=batch_size)
        row.update(gen_ppl=out["ppl"], nll_sum=out["nll_sum"], num_tokens=out["num_tokens"],
                   eval_seconds=out["seconds"], evaluator_load_seconds=out["load_seconds"])
        label = "data" if row.get("steps") is None else f"{row['steps']} steps"
        log(f"  {label:>9}: gen-PPL {row['gen_ppl']:9.2f}  entropy {row['entropy']:.3f}  "
            f"({out['num_tokens']} tokens scored in {out['seconds']:.1f} s)")
    return rows


# ============================================================================ outputs


def score_reward(reward: Callable, token_ids, vocab_size: int, batch_size: int = 256) -> dict:
    """{"reward": mean, "reward_se": standard error} of `reward` on the samples' one-hots."""
    ids = np.asarray(token_ids)
    values = np.concatenate([np.asarray(reward(jax.nn.one_hot(ids[i:i + batch_size], vocab_size)))
                             for i in range(0, len(ids), batch_size)])
    return {"reward": float(values.mean()), "reward_se": float(values.std(ddof=1) / np.sqrt(len(values)))
            if len(values) > 1 else 0.0}


def table(results: dict) -> str:
    """A Markdown table: one line per (model, steps), the data reference first; a reward column
    (mean ± s.e.) when the rows carry one."""
    rows = [row for model in results["models"].values() for row in model["rows"]]
    with_reward = any("reward" in row for row in rows)

    def line(*cells) -> str:
        return "| " + " | ".join(cells) + " |"

    def reward_cell(row: dict) -> tuple[str, ...]:
        if not with_reward:
            return ()
        return (f"{row['reward']:.3f} ± {row['reward_se']:.3f}" if "reward" in row else "–",)

    lines = [line("model", "steps", "gen-PPL", "entropy", *(("reward",) if with_reward else ()), "samples/s"),
             "|---|" + "---:|" * (4 + with_reward)]
    ref = results.get("reference")
    if ref is not None:
        lines.append(line("data", "–", f"{ref['gen_ppl']:.2f}", f"{ref['entropy']:.3f}", *reward_cell({}),
                          "–"))
    for label, model in results["models"].items():
        for row in model["rows"]:
            lines.append(line(label, str(row["steps"]), f"{row.get('gen_ppl', math.nan):.2f}",
                              f"{row.get('entropy', math.nan):.3f}", *reward_cell(row),
                              f"{row['samples_per_s']:.1f}"))
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
    """Writes whole or not at all (a kill mid-write keeps the previous file)."""
    with atomic.atomic_output(path, overwrite=True) as tmp, open(tmp, "w") as f:
        json.dump(_jsonable(results), f, indent=1)
    return path


def write_outputs(results: dict, out_dir: str, log: Log = print) -> dict:
    """results.json, gen_ppl.png (gen-PPL and entropy vs steps) and the printed table."""
    paths = {"json": write_json(results, os.path.join(out_dir, "results.json")),
             "plot": plots.plot_quality_vs_steps(results, os.path.join(out_dir, "gen_ppl.png"))}
    log(table(results))
    log(f"wrote {paths['json']} and {paths['plot']}")
    return paths
