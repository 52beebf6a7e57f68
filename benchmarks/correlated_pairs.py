"""One-step generation of strongly correlated token pairs: FMLM (PSD, LSD, ESD) vs FLM.

The data are two-token phrases ("new york", "san diego", ...). The exact denoiser at
τ = 0 factorises over positions, so a one-step FLM picks each token independently and
produces "new diego"; a distilled flow map can jump straight to a valid phrase. Trains
a tiny FLM teacher, distils it with each method and prints, for 1, 2 and 4 steps, the
fraction of valid phrases and the entropy of the sampled phrase distribution. The last
line is one JSON object.

python benchmarks/correlated_pairs.py [--teacher_steps N --distill_steps N --samples N]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time

import jax
import numpy as np

from fmlm_jax import config as fmlm_config
from fmlm_jax import sampling, train
from fmlm_jax.model import model_config
from fmlm_jax.objectives import distill

PHRASES = ("new york", "san diego", "los angeles", "hong kong", "las vegas", "buenos aires",
           "tel aviv", "kuala lumpur")
WORDS = sorted({w for p in PHRASES for w in p.split()})
PHRASE_IDS = [tuple(WORDS.index(w) for w in p.split()) for p in PHRASES]


def batches(batch_size: int, seed: int):
    rng = np.random.default_rng(seed)
    table = np.asarray(PHRASE_IDS, np.int32)
    while True:
        yield {"tokens": table[rng.integers(len(table), size=batch_size)]}


def _entropy(rows) -> float:
    counts = np.array(list(collections.Counter(rows).values()), np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def phrase_stats(ids: np.ndarray) -> dict:
    """valid_fraction: rows that are phrases; phrase_entropy (nats): entropy of the
    distribution over the phrases produced (valid rows only: diversity, measured apart
    from validity); sample_entropy: entropy over all rows, invalid ones included."""
    rows = [tuple(int(v) for v in row) for row in ids]
    valid_rows = [row for row in rows if row in set(PHRASE_IDS)]
    return dict(valid_fraction=len(valid_rows) / len(rows),
                phrase_entropy=_entropy(valid_rows) if valid_rows else 0.0,
                sample_entropy=_entropy(rows))


def base_config(two_time: bool, num_steps: int, method: str = "psd"):
    config = fmlm_config.defaults("fmlm" if two_time else "flm")
    config.model = model_config("tiny", vocab_size=len(WORDS), hidden_size=64, cond_dim=32,
                                n_blocks=2, n_heads=4, dropout=0.0, two_time=two_time)
    config.train.update(num_steps=num_steps, lr=1e-3, warmup_steps=100, b1=0.9, b2=0.999,
                        eps=1e-8, weight_decay=0.0, grad_clip=1.0, ema_decay=0.999)
    config.distill.update(method=method, use_teacher=True, boundary_prob=8.0)
    return config


def fit(config, state, rng, batch_size, seed, teacher=None, log=print, name=""):
    step_fn = train.jit_train_step(config)
    data = batches(batch_size, seed)
    start = time.time()
    for step in range(1, config.train.num_steps + 1):
        state, metrics = (step_fn(state, next(data), rng, teacher_params=teacher) if teacher
                          is not None else step_fn(state, next(data), rng))
        if step % max(config.train.num_steps // 4, 1) == 0:
            log(f"[{name}] step {step}: loss {float(metrics['loss']):.4f} "
                f"({time.time() - start:.0f}s)")
    return state


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher_steps", type=int, default=3000)
    parser.add_argument("--distill_steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--methods", default="psd,lsd,esd")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start = time.time()
    keys = jax.random.split(jax.random.key(args.seed), 4)

    teacher_cfg = base_config(False, args.teacher_steps)
    teacher_state = fit(teacher_cfg, train.create_train_state(teacher_cfg, keys[0]), keys[1],
                        args.batch_size, args.seed, log=log, name="flm teacher")
    teacher = teacher_state.ema_params

    z0 = jax.random.normal(keys[2], (args.samples, 2, len(WORDS)))
    results = []
    for steps in (1, 2, 4):
        ids = np.asarray(sampling.flm_sample(teacher, teacher_cfg.model, z0, steps))
        results.append(dict(model="flm", steps=steps, **phrase_stats(ids)))

    for method in args.methods.split(","):
        cfg = base_config(True, args.distill_steps, method)
        student = distill.init_student(teacher, cfg.model, keys[3])
        state = fit(cfg, train.create_train_state(cfg, keys[3], params=student), keys[1],
                    args.batch_size, args.seed + 1, teacher=teacher, log=log,
                    name=f"fmlm-{method}")
        for steps in (1, 2, 4):
            ids = np.asarray(sampling.fmlm_sample(state.ema_params, cfg.model, z0, steps))
            results.append(dict(model=f"fmlm-{method}", steps=steps, **phrase_stats(ids)))

    for r in results:
        log(f"{r['model']:>9} {r['steps']} step(s): valid {r['valid_fraction']:.3f}  "
            f"phrase entropy {r['phrase_entropy']:.3f}  (all samples {r['sample_entropy']:.3f})")
    log(f"total {time.time() - start:.0f}s")
    print(json.dumps({"data_entropy": math.log(len(PHRASES)), "results": results}))


if __name__ == "__main__":
    main()
