"""Train state, optimizer and the jitted train step (SPEC §4 recipe)."""

from __future__ import annotations

import functools
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
