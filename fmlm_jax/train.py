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

import functools
import json
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

from fmlm_jax import model as model_lib
from fmlm_jax import objectives


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
    kind = train_config.get("schedule", "constant")
    if kind == "constant":
        return optax.linear_schedule(0.0, train_config.lr, warmup)  # holds lr after warm-up
    if kind == "cosine":
        total = max(int(train_config.num_steps), warmup + 1)
        end = train_config.lr * train_config.get("final_lr_fraction", 0.0)
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


def grad_accum_steps(config) -> int:
    return int(config.train.get("grad_accum_steps", 1))


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

    n = grad_accum_steps(config)
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
    buffers (the loop uses `sharding.shard_train_step`, the same step with explicit shardings)."""
    return jax.jit(functools.partial(train_step, config=config), donate_argnums=0)


# ----------------------------------------------------------------------------- the loop

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendor datasheets); used for
# model FLOPs utilisation. Override with `train.peak_tflops` for other devices.
PEAK_TFLOPS = (
    ("NVIDIA H200", 989.0), ("NVIDIA H100", 989.0), ("NVIDIA A100", 312.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
)


def peak_flops_per_device(config) -> float | None:
    """The device's dense bf16 peak FLOP/s (None when unknown, e.g. on CPU)."""
    override = config.train.get("peak_tflops")
    if override:
        return float(override) * 1e12
    kind = jax.devices()[0].device_kind
    return next((tflops * 1e12 for prefix, tflops in PEAK_TFLOPS if kind.startswith(prefix)), None)


def forward_flops_per_token(model_config, seq_len: int, dense_input: bool = True) -> dict[str, float]:
    """Matmul FLOPs of one token's forward pass, by part (2 per multiply-add): the K×d input
    product of the dense path (a matmul on noisy one-hot vectors; a gather when projected),
    the blocks' linear layers, attention scores and values, and the d×K output layer.
    (benchmarks/flops.py counts the same per batch, with bytes, for the GPU estimates.)"""
    d, k, n = model_config.hidden_size, model_config.vocab_size, model_config.n_blocks
    mlp = model_config.get("mlp_ratio", 4)
    return {"input": 2.0 * k * d if dense_input else 0.0,
            "blocks_linear": 2.0 * n * (4 + 2 * mlp) * d * d,  # qkv 3d², out d², MLP 2·mlp·d²
            "attention": 2.0 * n * 2 * seq_len * d,  # QKᵀ and AV
            "output": 2.0 * d * k}


def flm_flops_per_token(config) -> float:
    """Model FLOPs of one FLM training token: forward + backward, the backward twice the
    forward except for the input product, whose only gradient is dE (the usual MFU count,
    6·N + 12·n·d·L in spirit; recomputation not counted)."""
    parts = forward_flops_per_token(config.model, config.data.seq_len,
                                    dense_input=not config.flm.get("projected_noise", False))
    return 3.0 * sum(parts.values()) - parts["input"]


def _process_batch_size(config) -> int:
    """This process's share of the global batch, after checking that it splits evenly."""
    global_batch, processes = int(config.data.batch_size), jax.process_count()
    if global_batch % processes:
        raise ValueError(f"data.batch_size {global_batch} (the global batch) must be divisible by the "
                         f"{processes} processes")
    return global_batch // processes


def make_data_iterator(config, split: str = "train"):
    """This process's batches of `split`: `data.source` 'synthetic' or 'prepared'.

    Each process reads its own shard (`jax.process_index()` of `jax.process_count()`) with
    `data.batch_size / process_count` rows; the iterator's position is checkpointable.
    """
    import grain

    from fmlm_jax.data import pipeline, synthetic

    source = config.data.get("source", "synthetic")
    batch = _process_batch_size(config)
    index, count = jax.process_index(), jax.process_count()
    if source == "synthetic":  # an endless stream; each process and split its own seed
        seed = config.seed + 1000 * index + (0 if split == "train" else 1)
        ds = synthetic.dataset(batch, config.data.seq_len, seed)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
    if source == "prepared":
        if not config.data.get("dir"):
            raise ValueError("data.source='prepared' needs data.dir (a directory written by "
                             "python -m fmlm_jax.data.prepare)")
        train = split == "train"
        return pipeline.make_iterator(config.data.dir, split, config.data.seq_len, batch, config.seed,
                                      shard_index=index, shard_count=count, shuffle=train,
                                      vocab_size=config.model.vocab_size)
    raise ValueError(f"data.source must be 'synthetic' or 'prepared', got {source!r}")


def make_decoder(config):
    """token ids (B, L) → texts, with the data's tokenizer, special tokens kept (SPEC §8)."""
    from fmlm_jax.data import synthetic

    if config.data.get("source", "synthetic") == "synthetic":
        tokenizer = synthetic.WordTokenizer()
        return lambda ids: [tokenizer.decode(row) for row in np.asarray(ids)]
    from fmlm_jax.data import pipeline, tokenizers

    meta = pipeline.load_meta(config.data.dir, "train", config.data.seq_len)
    name = config.data.get("tokenizer") or meta["tokenizer"]
    tokenizer = tokenizers.load_model_tokenizer(name, config.model.vocab_size)
    return lambda ids: tokenizers.decode(tokenizer, ids)


def sample_tokens(params, config, rng: jax.Array, num: int) -> jax.Array:
    """`num` sequences for a look during training: FLM with `train.sample_steps` Euler steps,
    FMLM with one step at γ = 0 (the reference's validation setting, SPEC §6). With
    `flm.projected_noise` the samplers start from (num, L, d) noise, not (num, L, K)."""
    from fmlm_jax import sampling

    projected = bool(config.flm.get("projected_noise", False))
    width = config.model.hidden_size if projected else config.model.vocab_size
    z0 = jax.random.normal(rng, (num, config.data.seq_len, width), jnp.float32)
    if config.get("mode", "train") == "distill":
        return sampling.fmlm_sample(params, config.model, z0, 1, gamma=0.0, projected=projected)
    return sampling.flm_sample(params, config.model, z0, int(config.train.get("sample_steps", 32)),
                               projected=projected)


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
    return params, reference


def _check_batch(config, mesh) -> None:
    rows, n = int(config.data.batch_size), grad_accum_steps(config)
    if n < 1 or rows % n:
        raise ValueError(f"train.grad_accum_steps {n} must be >= 1 and divide data.batch_size {rows}")
    if objectives.for_config(config) is objectives.distill and n > 1:
        objectives.distill.check_accumulation(rows, n, config)
    if (rows // n) % mesh.size:
        raise ValueError(f"each micro-batch of {rows // n} rows (data.batch_size / grad_accum_steps) must "
                         f"split evenly over the mesh's {mesh.size} devices ({dict(mesh.shape)}); change "
                         "data.batch_size, train.grad_accum_steps or config.mesh")


def _check_sections(config) -> None:
    mode = config.get("mode", "train")
    if mode not in ("train", "distill"):
        raise ValueError(f"config.mode must be 'train' or 'distill', got {mode!r}")
    needed = ["data", "model", "train", "flm"] + (["distill"] if mode == "distill" else [])
    missing = [k for k in needed if k not in config]
    if missing:
        raise ValueError(f"the config lacks the section(s) {missing} that mode={mode!r} needs; see "
                         "configs/synthetic_demo.py (FLM) and configs/synthetic_distill.py (FMLM)")


def _check_same_run(meta: dict, config, workdir: str) -> None:
    """The workdir's run must be this run: same mode (architecture is checked by fingerprint)."""
    saved = (meta.get("config") or {}).get("mode", "train")
    if saved != config.get("mode", "train"):
        raise ValueError(f"{workdir} holds a mode={saved!r} run, but this config has "
                         f"mode={config.get('mode', 'train')!r}; use a fresh --workdir")


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


def train_and_evaluate(config, workdir: str, log=print) -> list[dict]:
    """Trains (FLM) or distils (FMLM) for `train.num_steps` on the mesh `config.mesh`,
    resuming from `workdir`.

    Every `log_every` steps: train metrics, steps/s, tokens/s and MFU (FLM, when the device
    peak is known) to TensorBoard (clu) + console + WORKDIR/metrics.jsonl; every `eval_every`
    steps: the objective on `eval_batches` held-out batches with the EMA weights; every
    `sample_every` steps: `sample_num` sequences decoded to text (WORKDIR/samples.jsonl);
    every `save_every` steps, at the end and on SIGTERM: an Orbax checkpoint. `workdir` may
    be a gs:// URL (checkpoints and TensorBoard events go there; the .jsonl files are only
    written to local workdirs). Returns the metric rows logged by this call.
    """
    from fmlm_jax import checkpoints

    _check_sections(config)
    if _is_local(workdir):  # a gs://... workdir: Orbax and TensorBoard write there directly
        os.makedirs(workdir, exist_ok=True)
    manager = checkpoints.open_manager(workdir, max_to_keep=config.train.get("keep_last", 3),
                                       keep_period=config.train.get("keep_every") or None)
    try:  # whatever fails, pending checkpoint writes finish and the manager's threads stop
        return _train(config, workdir, manager, log)
    finally:
        manager.wait_until_finished()
        manager.close()


def _is_local(workdir: str) -> bool:
    return "://" not in workdir


def _train(config, workdir: str, manager, log) -> list[dict]:
    """The body of `train_and_evaluate`, given the workdir's checkpoint manager."""
    from clu import metric_writers, periodic_actions

    from fmlm_jax import checkpoints, sharding
    from fmlm_jax.objectives import distill as distill_lib

    if manager.latest_step() is not None:  # before anything expensive: is it this run's workdir?
        _check_same_run(checkpoints.read_metadata(manager), config, workdir)
    mesh_config = config.get("mesh") or {}
    mesh = sharding.make_mesh(mesh_config.get("data", -1), mesh_config.get("fsdp", 1))
    _check_batch(config, mesh)
    run_rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(run_rng)
    eval_rng, sample_rng = jax.random.split(jax.random.fold_in(run_rng, 1))

    teacher, teacher_reference = _teacher(config)  # referenced by path + hash, never saved
    if teacher is not None:
        teacher = sharding.place(teacher, sharding.param_shardings(teacher, mesh))
        params = distill_lib.init_student(teacher, config.model, init_rng)
        state = sharding.init_train_state(config, mesh, init_rng, params=params)
    else:
        state = sharding.init_train_state(config, mesh, init_rng)
    data = make_data_iterator(config, "train")
    start = 0
    if manager.latest_step() is not None:
        state, start = checkpoints.restore_latest(manager, state, data_iterator=data, config=config)
        saved_rng = checkpoints.read_metadata(manager, start).get("rng")
        if saved_rng is not None:
            step_rng = jax.random.wrap_key_data(np.asarray(saved_rng, np.uint32))
        log(f"resumed from {workdir} at step {start}")

    batch_sh = sharding.batch_sharding(mesh)
    step_fn = sharding.shard_train_step(config, mesh, teacher_params=teacher)
    eval_fn = jax.jit(lambda params, batch, rng, *teacher: eval_step(params, batch, rng, config, *teacher))
    decode = make_decoder(config) if config.train.get("sample_every", 0) else None
    extra_args = () if teacher is None else (teacher,)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    num_steps = int(config.train.num_steps)
    log_every, save_every = int(config.train.log_every), int(config.train.get("save_every", 1000))
    eval_every, sample_every = (int(config.train.get(k, 0)) for k in ("eval_every", "sample_every"))
    progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                               every_steps=log_every, every_secs=None)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    peak = peak_flops_per_device(config)
    flops_per_step = (flm_flops_per_token(config) * tokens_per_step
                      if config.get("mode", "train") == "train" else None)
    meta = {"rng": np.asarray(jax.random.key_data(step_rng)).tolist()}
    if teacher_reference:
        meta["teacher"] = teacher_reference
    is_main = jax.process_index() == 0
    preemption = _Preemption()

    def append(name, row):  # JSON lines beside the checkpoints (local workdirs: no appends on GCS)
        if is_main and _is_local(workdir):
            with open(os.path.join(workdir, name), "a") as f:
                f.write(json.dumps(row) + "\n")

    rows, last_time, last_step = [], time.time(), start
    try:
        for step in range(start + 1, num_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = _to_global(next(data), batch_sh)
                state, metrics = step_fn(state, batch, step_rng, *extra_args)
            progress(step)
            last = step == num_steps
            preempted = not last and preemption.reached(manager, step)
            logging = step % log_every == 0 or last
            saving = step % save_every == 0 or last or preempted
            if not (logging or saving):
                continue
            values = _host(metrics)  # the only host syncs: log and save steps
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
                if flops_per_step is not None and peak is not None:
                    row["perf/mfu"] = flops_per_step * rate / (peak * jax.device_count())
                if eval_every and (step % eval_every == 0 or last):
                    with progress.timed("eval"):
                        row.update(evaluate(eval_fn, state.ema_params, config, eval_rng, batch_sh,
                                            extra_args))
                rows.append(row)
                append("metrics.jsonl", row)
                writer.write_scalars(step, {k: v for k, v in row.items() if k != "step"})
                eta = (num_steps - step) / max(rate, 1e-9)
                log(f"step {step}/{num_steps}: loss {values['loss']:.4f}"
                    + (f", val {row['val/loss']:.4f}" if "val/loss" in row else "")
                    + f" ({rate:.2f} steps/s, {rate * tokens_per_step:.0f} tokens/s"
                    + (f", MFU {100 * row['perf/mfu']:.1f}%" if "perf/mfu" in row else "")
                    + f", ETA {eta:.0f} s)")
                last_time, last_step = now, step
            if sample_every and (step % sample_every == 0 or last):
                with progress.timed("sample"):
                    ids = sample_tokens(state.ema_params, config, jax.random.fold_in(sample_rng, step),
                                        int(config.train.get("sample_num", 4)))
                    texts = decode(np.asarray(multihost_utils.process_allgather(ids, tiled=True)))
                append("samples.jsonl", {"step": step, "texts": texts})
                writer.write_texts(step, {"samples": "\n\n".join(texts)})
                log(f"step {step} sample: {texts[0][:200]!r}")
            if saving:
                with progress.timed("checkpoint"):
                    checkpoints.save(manager, step, state, data_iterator=data, config=config,
                                     metadata=meta)
            if preempted:
                manager.wait_until_finished()
                log(f"preempted: saved step {step} in {workdir}; run the same command to resume")
                break
    finally:
        preemption.close()
        writer.flush()
    return rows


def evaluate(eval_fn, params, config, rng, batch_sharding, extra_args=()) -> dict:
    """Mean of the objective's metrics over `train.eval_batches` batches of `data.valid_split`
    (the same batches, times and noise at every evaluation: a fresh iterator, a fixed rng)."""
    split = config.data.get("valid_split", "validation")
    data = make_data_iterator(config, split)
    totals: dict[str, float] = {}
    num = int(config.train.get("eval_batches", 4))
    for i in range(num):
        metrics = eval_fn(params, _to_global(next(data), batch_sharding), jax.random.fold_in(rng, i),
                          *extra_args)
        for k, v in _host(metrics).items():
            totals[k] = totals.get(k, 0.0) + v / num
    return {f"val/{k}": v for k, v in totals.items()}
