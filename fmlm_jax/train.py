"""Train state, optimizer, the jitted train step and the loop (SPEC §4–5 recipes).

train_and_evaluate(config, workdir): data → state (fresh or restored) → jitted steps →
metrics.jsonl + console → Orbax checkpoints (state, data iterator, meta) every
`train.save_every` steps and at the end. Resuming from WORKDIR reproduces the
uninterrupted run exactly: the step rng is the seed's key folded with the step, and the
data iterator's position is restored with the state.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from fmlm_jax import model as model_lib
from fmlm_jax.objectives import distill, flm


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of optimizer updates applied
    params: Any
    ema_params: Any
    opt_state: Any


def make_optimizer(train_config) -> optax.GradientTransformation:
    """Grad-norm clip → AdamW with linear warm-up to `lr`, then constant (SPEC §4)."""
    lr = optax.linear_schedule(0.0, train_config.lr, max(int(train_config.warmup_steps), 1))
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(
            lr,
            b1=train_config.b1,
            b2=train_config.b2,
            eps=train_config.eps,
            weight_decay=train_config.weight_decay,
        ),
    )


def ema_decay(num_updates: jax.Array, max_decay: float) -> jax.Array:
    """min(max_decay, (1 + n)/(10 + n)), n counting the update being applied (SPEC §4)."""
    n = num_updates.astype(jnp.float32)
    return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def create_train_state(config, rng: jax.Array, params=None) -> TrainState:
    """A fresh state; `params` (e.g. a student initialised from its teacher) or a new init."""
    if params is None:
        params = model_lib.init_params(config.model, rng)
    else:  # own buffers: the jitted step donates the state, never a caller's (teacher's) arrays
        params = jax.tree_util.tree_map(jnp.copy, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params),  # distinct buffers: the step donates both
        opt_state=make_optimizer(config.train).init(params),
    )


def loss_fn(params, batch, rng, config, teacher_params=None, ema_params=None):
    """The objective the config selects: FLM (`mode='train'`) or FMLM (`mode='distill'`)."""
    mode = config.get("mode", "train")
    if mode == "train":
        return flm.flm_loss(params, batch, rng, config)
    if mode == "distill":
        return distill.distill_loss(params, batch, rng, config, teacher_params, ema_params)
    raise ValueError(f"config.mode must be 'train' or 'distill', got {mode!r}")


def train_step(state: TrainState, batch: dict, rng: jax.Array, config,
               teacher_params=None) -> tuple[TrainState, dict]:
    """One update. `rng` is the run key; the step's key is rng folded with the step.

    teacher_params: the frozen FLM teacher (distillation with distill.use_teacher).
    """
    optimizer = make_optimizer(config.train)
    step_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, batch, step_rng, config, teacher_params,
                                  state.ema_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step + 1, config.train.ema_decay)
    ema_params = jax.tree_util.tree_map(
        lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
    )
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
    return new_state, metrics


def jit_train_step(config):
    """train_step compiled for `config`, donating the old state's buffers."""
    return jax.jit(functools.partial(train_step, config=config), donate_argnums=0)


# ----------------------------------------------------------------------------- the loop


def make_data_iterator(config):
    """The training batches the config names: `data.source` 'synthetic' or 'prepared'."""
    import grain

    from fmlm_jax.data import pipeline, synthetic

    source = config.data.get("source", "synthetic")
    if source == "synthetic":
        ds = synthetic.dataset(config.data.batch_size, config.data.seq_len, config.seed)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
    if source == "prepared":
        return pipeline.make_iterator(config.data.dir, "train", config.data.seq_len,
                                      config.data.batch_size, config.seed)
    raise ValueError(f"data.source must be 'synthetic' or 'prepared', got {source!r}")


def _teacher(config):
    """(the frozen FLM teacher's EMA weights, {'path', 'model_fingerprint'}) or (None, {})."""
    if config.get("mode", "train") != "distill" or not config.distill.use_teacher:
        return None, {}
    from fmlm_jax import checkpoints
    from fmlm_jax.objectives import distill as distill_lib

    path = config.distill.get("teacher_path")
    if not path:
        raise ValueError("mode='distill' with distill.use_teacher=True needs distill.teacher_path "
                         "(a training workdir or a converted checkpoint directory)")
    params, teacher_cfg = checkpoints.load_weights(path, weights="ema")
    checkpoints.check_compatible(
        {"model_config": dict(teacher_cfg), "model_fingerprint":
         checkpoints.model_fingerprint(teacher_cfg)},
        distill_lib.teacher_config(config.model), where=f"the teacher at {path}")
    reference = {"path": os.path.abspath(path),
                 "model_fingerprint": checkpoints.model_fingerprint(teacher_cfg)}
    return jax.tree_util.tree_map(jnp.asarray, params), reference


def train_and_evaluate(config, workdir: str, log=print) -> list[dict]:
    """Trains (FLM) or distils (FMLM) for `train.num_steps`, resuming from `workdir`.

    Returns the logged metric rows (also appended to WORKDIR/metrics.jsonl).
    """
    from fmlm_jax import checkpoints
    from fmlm_jax.objectives import distill as distill_lib

    os.makedirs(workdir, exist_ok=True)
    run_rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(run_rng)
    teacher, teacher_reference = _teacher(config)  # referenced by path + hash, never saved
    params = None
    if teacher is not None:
        params = distill_lib.init_student(teacher, config.model, init_rng)
    state = create_train_state(config, init_rng, params=params)
    data = make_data_iterator(config)
    manager = checkpoints.open_manager(workdir, max_to_keep=config.train.get("keep_last", 3),
                                       keep_period=config.train.get("keep_every") or None)
    restored = checkpoints.restore_latest(manager, state, data_iterator=data, config=config)
    if restored is not None:
        state, start = restored
        log(f"resumed from {workdir} at step {start}")
    else:
        start = 0

    step_fn = jit_train_step(config)
    rows, path = [], os.path.join(workdir, "metrics.jsonl")
    log_every, save_every = config.train.log_every, config.train.get("save_every", 1000)
    last_time, last_step = time.time(), start
    tokens_per_step = config.data.batch_size * config.data.seq_len
    for step in range(start + 1, config.train.num_steps + 1):
        state, metrics = step_fn(state, next(data), step_rng, teacher_params=teacher)
        last = step == config.train.num_steps
        logging, saving = step % log_every == 0 or last, step % save_every == 0 or last
        if not (logging or saving):
            continue
        values = {k: float(v) for k, v in metrics.items()}  # the only host sync: log/save steps
        if not all(math.isfinite(v) for v in values.values()):
            manager.wait_until_finished()
            raise FloatingPointError(
                f"non-finite metrics at step {step}: {values}; nothing was saved after them: the "
                f"last good checkpoint in {workdir} is step {manager.latest_step()} (lower "
                "train.lr or check the data)")
        if logging:
            now = time.time()
            rate = (step - last_step) / max(now - last_time, 1e-9)
            row = {"step": step, **{f"train/{k}": v for k, v in values.items()},
                   "perf/steps_per_s": rate, "perf/tokens_per_s": rate * tokens_per_step}
            rows.append(row)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"step {step}: loss {values['loss']:.4f} ({rate:.2f} steps/s)")
            last_time, last_step = now, step
        if saving:
            checkpoints.save(manager, step, state, data_iterator=data, config=config,
                             metadata={"teacher": teacher_reference} if teacher_reference else None)
    manager.wait_until_finished()
    manager.close()
    return rows
