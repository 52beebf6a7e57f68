"""Train state, optimizer, the train step and the loop (SPEC §4–5 recipes).

train_and_evaluate(config, workdir): mesh (`config.mesh`) → data (this process's shard) →
state (fresh, or restored from WORKDIR) → the sharded jitted step → metrics (clu:
TensorBoard + console, and WORKDIR/metrics.jsonl), validation, samples → Orbax
checkpoints (state, data iterator, meta with the run's rng) every `train.save_every`
steps, at the end and on SIGTERM. Resuming reproduces the uninterrupted run exactly: the
step rng is the run key folded with the step, and the data iterator's position is
restored with the state. The loop runs unchanged from one CPU to many hosts
(`jax.distributed.initialize()` is called by `fmlm_jax.main` when asked to).

Precision: `model.dtype='bfloat16'` runs the blocks and the output layer in bf16
(parameters, optimizer state, EMA, log-softmax and loss stay float32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from fmlm_jax import checkpoints, metrics, objectives, sampling, sharding
from fmlm_jax import config as fmlm_config
from fmlm_jax import model as model_lib
from fmlm_jax.data import loader, tokenizers


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of optimizer updates applied
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate(train_config) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then constant (SPEC §4, `schedule='constant'`) or a
    cosine decay to `final_lr_fraction`·lr at `num_steps` (`schedule='cosine'`, optional)."""
    warmup = max(int(train_config.warmup_steps), 1)
    kind = train_config.schedule
    if kind == "constant":
        return optax.linear_schedule(0.0, train_config.lr, warmup)  # holds lr after warm-up
    if kind == "cosine":
        total = max(int(train_config.num_steps), warmup + 1)
        end = train_config.lr * train_config.final_lr_fraction
        return optax.warmup_cosine_decay_schedule(0.0, train_config.lr, warmup, total, end)
    raise ValueError(f"train.schedule must be 'constant' or 'cosine', got {kind!r}")


def make_optimizer(train_config) -> optax.GradientTransformation:
    """Grad-norm clip → AdamW on the `learning_rate` schedule (SPEC §4)."""
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(
            learning_rate(train_config),
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


def loss_fn(params, batch, rng, config, teacher_params=None, ema_params=None, train: bool = True):
    """The objective the config selects, over the whole batch: (loss, metrics)."""
    objective = objectives.for_config(config)
    k_plan, k_dropout = jax.random.split(rng)
    plan = objective.draw_plan(k_plan, batch["tokens"].shape[0], config)
    metrics = objectives.finalize(objective.loss_terms(params, batch, plan, k_dropout, config,
                                                       teacher_params, ema_params, train))
    return metrics["loss"], metrics


def _micro_batches(x: jax.Array, n: int) -> jax.Array:
    """(B, ...) → (n, B/n, ...), micro-batch i = rows i, i+n, i+2n, ...: strided, so each
    device's rows stay on that device when the batch dim is sharded (no resharding)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


def gradients(params, batch, rng, config, teacher_params=None, ema_params=None):
    """(grads, metrics) of the objective over the global batch, in `train.grad_accum_steps`
    micro-batches.

    The per-row plan (times, row kinds, noise keys) is drawn once for the global batch and
    sliced, so accumulation changes memory, not the update: the antithetic strata and the
    distillation row split (boundary rows included) are those of the whole batch, every
    row gets the same noise, and the sums of loss and token counts over micro-batches
    are divided once. Only the dropout masks differ (one key per micro-batch).
    """
    objective = objectives.for_config(config)
    k_plan, k_dropout = jax.random.split(rng)
    plan = objective.draw_plan(k_plan, batch["tokens"].shape[0], config)

    def grad_fn(micro_batch, micro_plan, key):
        def loss_sum(p):
            terms = objective.loss_terms(p, micro_batch, micro_plan, key, config, teacher_params,
                                         ema_params)
            return terms["loss"][0], terms
        return jax.grad(loss_sum, has_aux=True)(params)

    n = int(config.train.grad_accum_steps)
    if n == 1:
        grads, terms = grad_fn(batch, plan, k_dropout)
    else:
        micro = jax.tree_util.tree_map(lambda x: _micro_batches(x, n), (batch, plan))
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       jax.eval_shape(grad_fn, *first, k_dropout))

        def add_micro_batch(total, xs):
            index, (micro_batch, micro_plan) = xs
            out = grad_fn(micro_batch, micro_plan, jax.random.fold_in(k_dropout, index))
            return jax.tree_util.tree_map(jnp.add, total, out), None

        (grads, terms), _ = jax.lax.scan(add_micro_batch, zeros, (jnp.arange(n), micro))
    count = jnp.maximum(terms["loss"][1], 1.0)
    return jax.tree_util.tree_map(lambda g: g / count, grads), objectives.finalize(terms)


def train_step(state: TrainState, batch: dict, rng: jax.Array, config,
               teacher_params=None) -> tuple[TrainState, dict]:
    """One update. `rng` is the run key; the step's key is rng folded with the step.

    teacher_params: the frozen FLM teacher (distillation with distill.use_teacher).
    """
    optimizer = make_optimizer(config.train)
    step_rng = jax.random.fold_in(rng, state.step)
    grads, metrics = gradients(state.params, batch, step_rng, config, teacher_params, state.ema_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step + 1, config.train.ema_decay)
    ema_params = jax.tree_util.tree_map(
        lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
    )
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
               "lr": learning_rate(config.train)(state.step)}
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params, batch: dict, rng: jax.Array, config, teacher_params=None) -> dict:
    """The objective's metrics on a held-out batch: `params` (the EMA weights), dropout off,
    a fixed `rng` so every evaluation sees the same times and noise."""
    _, metrics = loss_fn(params, batch, rng, config, teacher_params, params, train=False)
    return metrics


def jit_train_step(config):
    """train_step compiled for `config` on the default device, donating the old state's
    buffers (the loop uses `sharded_train_step`, the same step with explicit shardings)."""
    return jax.jit(functools.partial(train_step, config=config), donate_argnums=0)


def train_state_shapes(config):
    """ShapeDtypeStructs of `create_train_state(config, ...)`, nothing allocated."""
    return jax.eval_shape(lambda: create_train_state(config, jax.random.key(0)))


def init_train_state(config, mesh, rng: jax.Array, params=None) -> TrainState:
    """`create_train_state(config, rng, params)` created directly in its shardings on `mesh`
    (no full copy of the parameters on one device first, unless `params` are given, e.g. a
    student initialised from its teacher)."""
    shardings = sharding.state_shardings(train_state_shapes(config), mesh)
    if params is None:
        return jax.jit(lambda key: create_train_state(config, key), out_shardings=shardings)(rng)
    return jax.jit(lambda key, p: create_train_state(config, key, params=p),
                   out_shardings=shardings)(rng, params)


def sharded_train_step(config, mesh, teacher_params=None):
    """`train_step` jitted with explicit shardings on `mesh`, donating the state.

    Returns step(state, batch, rng) → (state, metrics), or with `teacher_params` (arrays or
    shapes; only their structure is used) step(state, batch, rng, teacher_params). Inputs
    are placed as `sharding.state_shardings` and `sharding.batch_sharding` say; the batch
    size must be divisible by mesh.size.
    """
    state_sh = sharding.state_shardings(train_state_shapes(config), mesh)
    rep = sharding.replicated(mesh)
    in_sh = [state_sh, sharding.batch_sharding(mesh), rep]
    if teacher_params is None:
        def step(state, batch, rng):
            return train_step(state, batch, rng, config)
    else:
        in_sh.append(sharding.param_shardings(teacher_params, mesh))

        def step(state, batch, rng, teacher):
            return train_step(state, batch, rng, config, teacher_params=teacher)

    return jax.jit(step, in_shardings=tuple(in_sh), out_shardings=(state_sh, rep), donate_argnums=0)


# ----------------------------------------------------------------------------- the loop


def load_teacher(config) -> tuple[Any, dict]:
    """(the frozen FLM teacher's EMA weights, {'path', 'model_fingerprint'}) when the run
    distils from one (mode 'fmlm', distill.use_teacher), else (None, {})."""
    if config.mode != "fmlm" or not config.distill.use_teacher:
        return None, {}
    path = config.distill.teacher_path
    if not path:
        raise ValueError("mode='fmlm' with distill.use_teacher=True needs distill.teacher_path (an FLM "
                         "training workdir, an export or a reference .ckpt)")
    params, teacher_cfg, _ = checkpoints.load(path, weights="ema")
    checkpoints.check_compatible({"model_config": model_lib.config_json(teacher_cfg)},
                                 objectives.distill.teacher_config(config.model),
                                 where=f"the teacher at {path}")
    return params, {"path": os.path.abspath(path),
                    "model_fingerprint": checkpoints.model_fingerprint(teacher_cfg)}


def _check_mesh(config, mesh) -> None:
    rows = int(config.data.batch_size) // int(config.train.grad_accum_steps)
    if rows % mesh.size:
        raise ValueError(f"each micro-batch of {rows} rows (data.batch_size / grad_accum_steps) must split "
                         f"evenly over the mesh's {mesh.size} devices ({dict(mesh.shape)}); change "
                         "data.batch_size, train.grad_accum_steps or config.mesh")


def _check_same_run(meta: dict, config, workdir: str) -> None:
    """The workdir's run must be this run: same mode (architecture is checked by fingerprint)."""
    saved = checkpoints.run_mode(meta)
    if saved != config.mode:
        raise ValueError(f"{workdir} holds a mode={saved!r} run, but this config has mode={config.mode!r}; "
                         "use a fresh --workdir")


def _to_global(batch: dict, batch_sharding) -> dict:
    """This process's rows → one global jax.Array per field, laid out as `batch_sharding`."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in batch.items()}


def _host(tree) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


class _Preemption:
    """SIGTERM (SLURM requeue, spot VM reclaim) asks the loop to save and stop at the next
    step; with several processes Orbax's preemption sync point decides, so all agree."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no handler, the periodic saves remain
                self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, manager, step: int) -> bool:
        if jax.process_count() > 1:
            return manager.reached_preemption(step)
        return self.requested

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class _Run:
    """What the loop works with, set up by `_setup`."""

    state: TrainState
    start: int  # the last step already done (0: a fresh run)
    data: Any  # this process's checkpointable batch iterator
    step_fn: Any
    step_rng: jax.Array  # the run key each step folds its number into
    eval_rng: jax.Array
    sample_rng: jax.Array
    teacher: tuple  # () or (teacher_params,): the step's extra argument
    batch_sharding: Any
    meta: dict  # extra checkpoint metadata: the run key, the teacher reference


def _setup(config, workdir: str, manager, mesh, log) -> _Run:
    """Keys, teacher, the sharded state (fresh, or restored with the data position), the step."""
    saved = checkpoints.newest_metadata(manager)  # before anything expensive: is it this run's workdir?
    if saved is not None:
        _check_same_run(saved, config, workdir)
    run_rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(run_rng)
    eval_rng, sample_rng = jax.random.split(jax.random.fold_in(run_rng, 1))
    teacher, teacher_reference = load_teacher(config)  # referenced by path + hash, never saved
    params = None
    if teacher is not None:
        teacher = sharding.place(teacher, sharding.param_shardings(teacher, mesh))
        params = objectives.distill.init_student(teacher, config.model, init_rng)
    state = init_train_state(config, mesh, init_rng, params=params)
    data = loader.make_iterator(config, "train")
    start = 0
    restored = checkpoints.restore_latest(manager, state, data_iterator=data, config=config,
                                          warn=lambda message: log(f"warning: {message}"))
    if restored is not None:  # a damaged newer step is reported and moved aside
        state, start = restored
        saved_rng = checkpoints.read_metadata(manager, start).get("rng")
        if saved_rng is not None:
            step_rng = jax.random.wrap_key_data(np.asarray(saved_rng, np.uint32))
        log(f"resumed from {workdir} at step {start}")
    meta = {"rng": np.asarray(jax.random.key_data(step_rng)).tolist()}
    if teacher_reference:
        meta["teacher"] = teacher_reference
    return _Run(state=state, start=start, data=data, step_fn=sharded_train_step(config, mesh, teacher),
                step_rng=step_rng, eval_rng=eval_rng, sample_rng=sample_rng,
                teacher=() if teacher is None else (teacher,), batch_sharding=sharding.batch_sharding(mesh),
                meta=meta)


def train_and_evaluate(config, workdir: str, log=print) -> list[dict]:
    """Trains (FLM, mode 'flm') or distils (FMLM, mode 'fmlm') for `train.num_steps` on the
    mesh `config.mesh`, resuming from `workdir`.

    Every `log_every` steps: train metrics, steps/s, tokens/s and MFU (FLM, when the device
    peak is known) to TensorBoard (clu) + console + WORKDIR/metrics.jsonl; every `eval_every`
    steps: the objective on `eval_batches` held-out batches with the EMA weights; every
    `sample_every` steps: `sample_num` sequences decoded to text (WORKDIR/samples.jsonl);
    every `save_every` steps, at the end and on SIGTERM: an Orbax checkpoint. `workdir` may
    be a gs:// URL (checkpoints and TensorBoard events go there; the .jsonl files are only
    written to local workdirs). Nothing is created when the config is refused. Returns the
    metric rows logged by this call.
    """
    fmlm_config.validate(config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    _check_mesh(config, mesh)
    made = []  # the directories this call creates: removed again if setup is refused
    if metrics.is_local(workdir):  # a gs://... workdir: Orbax and TensorBoard write there directly
        made = _missing_dirs(workdir)
        os.makedirs(workdir, exist_ok=True)
    manager = checkpoints.open_manager(workdir, max_to_keep=config.train.keep_last or None,
                                       keep_period=config.train.keep_every or None)
    try:
        run = _setup(config, workdir, manager, mesh, log)
    except BaseException:  # a missing teacher, a refused workdir: leave no empty workdir behind
        manager.close()
        _remove_empty(made)
        raise
    try:  # whatever fails, pending checkpoint writes finish and the manager's threads stop
        rows = _loop(config, workdir, manager, run, log)
        finish_saves(manager)
        return rows
    finally:
        manager.wait_until_finished()
        manager.close()


def finish_saves(manager) -> None:
    """Waits for the pending background save; its OSError (a full disk, a revoked permission)
    is raised again naming the step that failed and the last complete one, which is kept
    (the failed step's `*.orbax-checkpoint-tmp*` directory is removed at the next start)."""
    try:
        manager.wait_until_finished()
    except OSError as error:
        manager.reload()
        raise OSError(error.errno, f"{error.strerror} while writing a checkpoint; the last complete "
                      f"checkpoint is step {manager.latest_step()} in {manager.directory}",
                      error.filename) from error


def _missing_dirs(path: str) -> list[str]:
    """`path` and those of its ancestors that do not exist yet, innermost first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_empty(directories: list[str]) -> None:
    for directory in directories:  # innermost first; a directory with anything in it stays
        try:
            os.rmdir(directory)
        except OSError:
            return


def _loop(config, workdir: str, manager, run: _Run, log) -> list[dict]:
    t = config.train
    num_steps = int(t.num_steps)
    writer = metrics.MetricWriter(workdir)
    progress = writer.report_progress(num_steps, int(t.log_every))
    eval_fn = jax.jit(lambda params, batch, rng, *teacher: eval_step(params, batch, rng, config, *teacher))
    decode = _decoder(config) if t.sample_every else None
    tokens_per_step = config.data.batch_size * config.data.seq_len
    preemption = _Preemption()
    rows, last_time, last_step = [], time.time(), run.start
    try:
        for step in range(run.start + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = _to_global(next(run.data), run.batch_sharding)
                run.state, step_metrics = run.step_fn(run.state, batch, run.step_rng, *run.teacher)
            progress(step)
            last = step == num_steps
            preempted = not last and preemption.reached(manager, step)
            logging = step % t.log_every == 0 or last
            saving = step % t.save_every == 0 or last or preempted
            if not (logging or saving):
                continue
            values = _host(step_metrics)  # the only host syncs: log and save steps
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
                       **_performance(config, rate)}
                if t.eval_every and (step % t.eval_every == 0 or last):
                    with progress.timed("eval"):
                        row.update(validation_metrics(eval_fn, run.state.ema_params, config, run.eval_rng,
                                                      run.batch_sharding, run.teacher))
                rows.append(row)
                writer.scalars(step, {k: v for k, v in row.items() if k != "step"})
                log(_progress_line(row, step, num_steps, rate, tokens_per_step))
                last_time, last_step = now, step
            if t.sample_every and (step % t.sample_every == 0 or last):
                with progress.timed("sample"):
                    texts = decode(_sample_tokens(run.state.ema_params, config,
                                                  jax.random.fold_in(run.sample_rng, step)))
                writer.texts(step, texts)
                log(f"step {step} sample: {texts[0][:200]!r}")
            if saving:
                with progress.timed("checkpoint"):
                    finish_saves(manager)  # the previous save failed (disk full)? stop here, say so
                    checkpoints.save(manager, step, run.state, data_iterator=run.data, config=config,
                                     metadata=run.meta)
            if preempted:
                manager.wait_until_finished()
                log(f"preempted: saved step {step} in {workdir}; run the same command to resume")
                break
    finally:
        preemption.close()
        writer.close()
    return rows


def _performance(config, steps_per_s: float) -> dict:
    """perf/steps_per_s, perf/tokens_per_s and, for FLM on a device of known peak, perf/mfu."""
    tokens_per_s = steps_per_s * config.data.batch_size * config.data.seq_len
    row = {"perf/steps_per_s": steps_per_s, "perf/tokens_per_s": tokens_per_s}
    if config.mode == "flm":
        flops = metrics.flm_train_flops_per_token(config.model, config.data.seq_len,
                                                  config.flm.projected_noise)
        peak = metrics.device_peak(jax.devices()[0].device_kind, config.train.peak_tflops)
        utilisation = metrics.mfu(flops * tokens_per_s, peak, jax.device_count())
        if utilisation is not None:
            row["perf/mfu"] = utilisation
    return row


def _progress_line(row: dict, step: int, num_steps: int, rate: float, tokens_per_step: int) -> str:
    eta = (num_steps - step) / max(rate, 1e-9)
    return (f"step {step}/{num_steps}: loss {row['train/loss']:.4f}"
            + (f", val {row['val/loss']:.4f}" if "val/loss" in row else "")
            + f" ({rate:.2f} steps/s, {rate * tokens_per_step:.0f} tokens/s"
            + (f", MFU {100 * row['perf/mfu']:.1f}%" if "perf/mfu" in row else "")
            + f", ETA {eta:.0f} s)")


def _decoder(config):
    """token ids (B, L) → texts, with the run's tokenizer (special tokens kept, SPEC §8)."""
    tokenizer = loader.run_tokenizer(config)
    return lambda ids: tokenizers.decode(tokenizer, ids)


def _sample_tokens(params, config, rng: jax.Array) -> np.ndarray:
    """`train.sample_num` sequences for a look during training, gathered from every process:
    FLM with `train.sample_steps` Euler steps, FMLM with one step at γ = 0 (the reference's
    validation setting, SPEC §6); projected noise with `flm.projected_noise`."""
    projected = config.flm.projected_noise
    z0 = sampling.initial_noise(rng, config.train.sample_num, config.data.seq_len, config.model, projected)
    steps = 1 if config.mode == "fmlm" else config.train.sample_steps
    ids = sampling.generate(params, config.model, z0, steps, projected=projected)
    return np.asarray(multihost_utils.process_allgather(ids, tiled=True))


def validation_metrics(eval_fn, params, config, rng, batch_sharding, teacher=()) -> dict:
    """Mean of the objective's metrics over `train.eval_batches` batches of `data.valid_split`
    (the same batches, times and noise at every evaluation: a fresh iterator, a fixed rng)."""
    data = loader.make_iterator(config, config.data.valid_split)
    totals: dict[str, float] = {}
    num = int(config.train.eval_batches)
    for i in range(num):
        batch = _to_global(next(data), batch_sharding)
        for k, v in _host(eval_fn(params, batch, jax.random.fold_in(rng, i), *teacher)).items():
            totals[k] = totals.get(k, 0.0) + v / num
    return {f"val/{k}": v for k, v in totals.items()}
