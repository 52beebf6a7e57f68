"""The FMLM distillation loss over a batch (SPEC §5): rows, networks, one term per method.

    terms = loss_terms(params, batch, plan, dropout_rng, config, teacher_params, ema_params)
    loss, metrics = distill_loss(params, batch, rng, config, teacher_params, ema_params)
    loss, metrics = distill_loss_at(params, tokens, mask, times, noise, n_diag, dropout_rng, config, ...)

`distill_loss_at` is the explicit entry point: the times (τ_s, τ_u, τ_t) of every row, the
noise ε of every row and the number of leading diagonal rows are given, nothing is drawn.
Everything else calls it.

Reduction: sum over the vocabulary, mean over every valid token of the global batch, all
row kinds pooled (diagonal, boundary, off-diagonal); ESD leaves its t = 1 rows out of both
the sum and the count. Diagonal and off-diagonal losses are also reported apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fmlm_jax import interpolant
from fmlm_jax import model as model_lib
from fmlm_jax.objectives.distill import chunked, targets
from fmlm_jax.objectives.distill import rows as rows_lib
from fmlm_jax.objectives.flm import finalize
from fmlm_jax.schedule import Schedule

METHODS = ("psd", "lsd", "esd")


def teacher_config(student_config):
    """The FLM teacher of a student config: one-time, no loss weighting (SPEC §5)."""
    cfg = model_lib.resolve_config(student_config)
    cfg.two_time = False
    cfg.learnable_loss_weighting = False
    return cfg


def init_student(teacher_params, student_config, rng: jax.Array) -> dict:
    """Student = teacher weights + fresh `sigma_map_prime` whose last Linear is zero,
    so δ_{s,t} = D_s at step 0 (SPEC §5). Loss weighting, if any, starts fresh."""
    cfg = model_lib.resolve_config(student_config)
    if not cfg.two_time:
        raise ValueError("the FMLM student must be two-time (model.two_time=True)")
    params = dict(model_lib.init_params(cfg, rng))
    for key, value in teacher_params.items():
        if key not in params:
            raise ValueError(f"teacher parameter {key!r} has no place in the student")
        shapes = jax.tree_util.tree_map(jnp.shape, value)
        want = jax.tree_util.tree_map(jnp.shape, params[key])
        if shapes != want:
            raise ValueError(f"teacher {key!r} has shapes {shapes}, the student expects {want}")
        params[key] = jax.tree_util.tree_map(jnp.asarray, value)
    prime = dict(params["sigma_map_prime"])
    prime["mlp_2"] = jax.tree_util.tree_map(jnp.zeros_like, prime["mlp_2"])
    params["sigma_map_prime"] = prime
    return params


def projected_noise_enabled(config) -> bool:
    """The one switch for the projected-noise path (SPEC §10): `config.flm.projected_noise`."""
    flm = config.get("flm") if hasattr(config, "get") else None
    return bool(flm.get("projected_noise", False)) if flm is not None else False


# ------------------------------------------------------------------ noisy inputs


def noise_width(params, config, teacher_params=None, ema_params=None) -> int:
    """Width of the per-row noise: K (dense), or the rank r of the joint projection (SPEC §10)."""
    if not projected_noise_enabled(config):
        return config.model.vocab_size
    return sum(p["vocab_embed"]["embedding"].shape[1] for p in
               _networks(params, config, teacher_params, ema_params).values())


def _networks(params, config, teacher_params, ema_params) -> dict:
    """The parameter sets that read x_s: student, teacher (if any), EMA target (if used)."""
    nets = {"student": params}
    if config.distill.use_teacher:
        nets["teacher"] = teacher_params
    if _ema_targets(config):
        nets["ema"] = ema_params
    return nets


def _ema_targets(config) -> bool:
    return config.distill.method == "psd" and config.distill.use_ema_for_psd_target


def noisy_state(tokens, s, eps, nets: dict, projected: bool):
    """(x_s, lift): x_s = (1−s)·ε + s·onehot(x₁) as one dense (N, L, K) array, or with
    `projected` as {name: x_s·E_name} for each network, drawn jointly from ε̃ (N, L, r)
    through `interpolant.joint_noise_factors`. lift(δ) puts a probability vector in the
    same form (identity, or {name: δ·E_name})."""
    if not projected:
        return interpolant.noisy(tokens, s, eps), targets.identity
    embeddings = {name: p["vocab_embed"]["embedding"].astype(jnp.float32) for name, p in nets.items()}
    factors = dict(zip(embeddings, interpolant.joint_noise_factors(list(embeddings.values())),
                       strict=True))
    row = targets.rows(s)
    x_s = {name: (1.0 - row) * jnp.einsum("blr,rd->bld", eps, factors[name])
           + row * embeddings[name][tokens] for name in embeddings}

    def lift(delta):
        return {name: interpolant.lift(delta, e) for name, e in embeddings.items()}

    return x_s, lift


# ------------------------------------------------------------------ the terms


@dataclasses.dataclass(frozen=True)
class Rows:
    """The non-diagonal rows of a batch: state x_s, network times τ and interpolant times t."""

    x: object  # (n, L, K) or {name: (n, L, d)}
    tokens: jax.Array
    tau_s: jax.Array
    tau_u: jax.Array
    tau_t: jax.Array
    s: jax.Array
    u: jax.Array
    t: jax.Array


@dataclasses.dataclass(frozen=True)
class Networks:
    """The log-denoisers one loss evaluation uses, each with its own dropout key."""

    student: Callable  # δ_{s,t} with gradient (train mode)
    student_target: Callable  # the student's own weights for targets (train mode, no gradient)
    student_target2: Callable  # ... a second pass with another dropout key
    teacher: Callable | None  # D_s of the frozen FLM teacher (eval mode)
    ema: Callable | None  # EMA weights for PSD targets (eval mode: no dropout)
    lift: Callable


def _psd_term(r: Rows, nets: Networks, dc, schedule):
    """PSD: −Σ δ̄·log δ_{s,t} (or Σ(δ − δ̄)² with use_mse_loss_psd) towards the semigroup target."""
    first, second = (nets.ema, nets.ema) if dc.use_ema_for_psd_target else (
        nets.student_target, nets.student_target2)
    target = targets.psd_target(first, r.x, r.tau_s, r.tau_u, r.tau_t, r.s, r.u, r.t,
                                second_pass=second, lift=nets.lift)
    log_p = nets.student(r.x, r.tau_s, r.tau_t)
    if dc.use_mse_loss_psd:
        loss = jnp.sum((jnp.exp(log_p) - target) ** 2, axis=-1)
    else:
        loss = -jnp.sum(target * log_p, axis=-1)
    if dc.rescale_offdiag_loss_psd:
        loss = loss * (((r.t - r.s) / (1.0 - r.s + interpolant.FLOW_MAP_EPS)) ** 2)[:, None]
    return loss, jnp.ones_like(r.t, bool)


def _lsd_term(r: Rows, nets: Networks, dc, schedule):
    """LSD: −Σ δ̄·log δ_{s,t}, δ̄ the entmax-projected Lagrangian target."""
    if nets.teacher is not None and dc.use_teacher_for_D_t_lsd:
        d_t = nets.teacher
    else:  # the reference default: the student's own diagonal δ_{t,t}
        d_t = nets.student_target
    log_p, target = targets.lsd_target(nets.student, d_t, r.x, r.tau_s, r.tau_t, r.s, r.t,
                                       schedule.dtau_dt(r.t), dc.entmax_temp_lsd, lift=nets.lift)
    return -jnp.sum(target * log_p, axis=-1), jnp.ones_like(r.t, bool)


def _esd_term(r: Rows, nets: Networks, dc, schedule):
    """ESD: Σ(δ − δ̄)²; rows with t = 1 have no finite target and are left out (the
    reference divides by 1e-8 there)."""
    if nets.teacher is not None:
        d_s = nets.teacher(r.x, r.tau_s, None)
    else:  # the student's own diagonal δ_{s,s} (the reference wrongly uses δ_{s,t})
        d_s = nets.student_target(r.x, r.tau_s, r.tau_s)
    d_s = jax.lax.stop_gradient(jnp.exp(d_s))
    delta, target = targets.esd_target(nets.student, d_s, r.x, r.tau_s, r.tau_t, r.s, r.t,
                                       schedule.dtau_dt(r.s), lift=nets.lift)
    return jnp.sum((delta - target) ** 2, axis=-1), r.t < 1.0


METHOD_TERMS = {"psd": _psd_term, "lsd": _lsd_term, "esd": _esd_term}


def _diagonal_term(x, tokens, tau, nets: Networks, dc) -> jax.Array:
    """Per-token loss of the diagonal rows towards D_s (teacher) or the data one-hot.

    Cross-entropy −Σ target·log δ_{s,s}; with PSD's use_mse_loss_psd, Σ(δ_{s,s} − target)²
    as in the reference, which switches both terms."""
    log_diag = nets.student(x, tau, tau)
    mse = dc.method == "psd" and dc.use_mse_loss_psd
    if nets.teacher is None:  # self-distillation: the data one-hot
        if mse:
            onehot = jax.nn.one_hot(tokens, log_diag.shape[-1], dtype=log_diag.dtype)
            return jnp.sum((jnp.exp(log_diag) - onehot) ** 2, axis=-1)
        return -jnp.take_along_axis(log_diag, tokens[..., None], axis=-1)[..., 0]
    target = jax.lax.stop_gradient(jnp.exp(nets.teacher(x, tau, None)))
    if mse:
        return jnp.sum((jnp.exp(log_diag) - target) ** 2, axis=-1)
    return -jnp.sum(target * log_diag, axis=-1)


def _check(params, config, teacher_params, ema_params) -> None:
    dc = config.distill
    if dc.method not in METHODS:
        raise ValueError(f"distill.method must be one of {METHODS}, got {dc.method!r}")
    if dc.use_teacher and teacher_params is None:
        raise ValueError("distill.use_teacher=True but no teacher_params were given")
    if _ema_targets(config) and ema_params is None:
        raise ValueError("distill.use_ema_for_psd_target=True but no ema_params were given")


def distill_terms_at(params, tokens, mask, times, noise, n_diag: int, dropout_rng, config,
                     teacher_params=None, ema_params=None, train: bool = True) -> dict:
    """{name: (sum, count)} of the distillation loss for explicit times and noise (SPEC §5).

    tokens (N, L); mask (N, L) or None; times = (τ_s, τ_u, τ_t), each (N,); noise ε
    (N, L, K) dense, or (N, L, r) with `flm.projected_noise` (r = `noise_width`); the first
    `n_diag` rows are diagonal (τ_s = τ_t), the rest boundary or off-diagonal.
    dropout_rng: the student's dropout keys (train mode).
    """
    _check(params, config, teacher_params, ema_params)
    mc = config.model
    mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    schedule = Schedule(mc.vocab_size)
    tau_s, tau_u, tau_t = times
    s, u, t = schedule.tau_to_t(tau_s), schedule.tau_to_t(tau_u), schedule.tau_to_t(tau_t)
    projected = projected_noise_enabled(config)
    x_s, lift = noisy_state(tokens, s, noise, _networks(params, config, teacher_params, ema_params),
                            projected)

    k_diag, k_off, k_target1, k_target2 = jax.random.split(dropout_rng, 4)
    if chunked.chunk_size(config) > 0:
        diag_loss, off_loss, keep = _chunked_terms(
            params, tokens, (tau_s, tau_u, tau_t), (s, u, t), x_s, n_diag,
            (k_diag, k_off, k_target1, k_target2), config, teacher_params, ema_params, train, schedule,
            projected)
    else:
        diag_loss, off_loss, keep = _unchunked_terms(
            params, tokens, (tau_s, tau_u, tau_t), (s, u, t), x_s, lift, n_diag,
            (k_diag, k_off, k_target1, k_target2), config, teacher_params, ema_params, train, schedule,
            projected)
    diag_mask, off_mask = _head(mask, n_diag), _tail(mask, n_diag) * keep[:, None]

    per_token = jnp.concatenate([diag_loss, off_loss], axis=0)  # (N, L)
    full_mask = jnp.concatenate([diag_mask, off_mask], axis=0)
    if mc.learnable_loss_weighting:
        w = model_lib.DiT(mc).apply({"params": params}, tau_s, method=model_lib.DiT.loss_weight)
        per_token = jnp.exp(-w)[:, None] * per_token + w[:, None]
    n = jnp.asarray(tokens.shape[0], jnp.float32)
    boundary = jnp.sum((_tail(tau_s, n_diag) == 0.0) & (_tail(tau_t, n_diag) == 1.0)).astype(jnp.float32)
    return {
        "loss": ((per_token * full_mask).sum(), full_mask.sum()),
        "diag_loss": ((diag_loss * diag_mask).sum(), diag_mask.sum()),
        "offdiag_loss": ((off_loss * off_mask).sum(), off_mask.sum()),
        # Fractions of the rows by kind (× the global batch: the row counts of the update).
        "rows_diagonal": (jnp.asarray(n_diag, jnp.float32), n),
        "rows_boundary": (boundary, n),
        "rows_offdiagonal": (n - n_diag - boundary, n),
    }


def _head(a, n_diag: int):
    return jax.tree_util.tree_map(lambda v: v[:n_diag], a)


def _tail(a, n_diag: int):
    return jax.tree_util.tree_map(lambda v: v[n_diag:], a)


def _unchunked_terms(params, tokens, taus, times, x_s, lift, n_diag, keys, config, teacher_params,
                     ema_params, train, schedule, projected):
    """(diagonal (n_diag, L), off-diagonal (N − n_diag, L) per-token losses, kept rows) with
    every (N, L, K) tensor of the batch built at once (distill.chunk_size=0)."""
    dc, mc = config.distill, config.model
    impl = mc.get("attention_impl", "xla")
    if dc.method in ("lsd", "esd") and impl != "xla":
        raise ValueError(
            f"distill.method={dc.method!r} takes a jvp through the student, which the fused "
            f"model.attention_impl={impl!r} cannot give with distill.chunk_size=0 (unchunked); set "
            "distill.chunk_size > 0 (its jvp runs through XLA attention) or model.attention_impl='xla'")
    tau_s, tau_u, tau_t = taus
    s, u, t = times
    k_diag, k_off, k_target1, k_target2 = keys

    def network(name, weights, model_config, **kwargs):  # reads the array, or its own projected form
        fn = model_lib.log_denoiser(weights, model_config, embedded=projected, **kwargs)
        return (lambda x, a, b: fn(x[name], a, b)) if projected else fn

    def student(key):
        return network("student", params, mc, train=train, rng=key)

    teacher = network("teacher", teacher_params, teacher_config(mc)) if dc.use_teacher else None
    # EMA targets in eval mode (no dropout), as the reference.
    ema = network("ema", ema_params, mc) if _ema_targets(config) else None
    nets = Networks(student=student(k_off), student_target=student(k_target1),
                    student_target2=student(k_target2), teacher=teacher, ema=ema, lift=lift)

    def head(a):
        return _head(a, n_diag)

    def tail(a):
        return _tail(a, n_diag)

    diag_nets = dataclasses.replace(nets, student=student(k_diag))
    diag_loss = _diagonal_term(head(x_s), head(tokens), head(tau_s), diag_nets, dc)
    off = Rows(tail(x_s), tail(tokens), tail(tau_s), tail(tau_u), tail(tau_t), tail(s), tail(u), tail(t))
    off_loss, keep = METHOD_TERMS[dc.method](off, nets, dc, schedule)
    return diag_loss, off_loss, keep


def _chunked_terms(params, tokens, taus, times, x_s, n_diag, keys, config, teacher_params, ema_params,
                   train, schedule, projected):
    """As `_unchunked_terms`, with the K-wide work chunked over tokens (`chunked`): every
    network runs its trunk on projected inputs h = x·E (N, L, d)."""
    dc, mc = config.distill, config.model
    chunk = chunked.chunk_size(config)
    tau_s, tau_u, tau_t = taus
    s, u, t = times
    k_diag, k_off, k_target1, k_target2 = keys

    def parts(name, weights, model_config, **kwargs):
        return model_lib.denoiser_parts(weights, model_config, **kwargs), name

    def student(key, **kwargs):
        return parts("student", params, mc, train=train, rng=key, **kwargs)

    nets = {"student": student(k_off)}
    # The jvp of LSD/ESD goes through XLA attention (a custom-VJP kernel has no jvp): the same
    # weights and dropout key; the same object when the configured attention is XLA already.
    nets["student_jvp"] = (nets["student"] if mc.get("attention_impl", "xla") == "xla"
                           else student(k_off, attention_impl="xla"))
    if dc.use_teacher:
        nets["teacher"] = parts("teacher", teacher_params, teacher_config(mc))
    if _ema_targets(config):  # EMA targets in eval mode (no dropout), as the reference
        nets["ema"] = parts("ema", ema_params, mc)
    if projected:
        h = x_s
    else:  # h = x_s·E for each network that reads x_s, the product its own input layer makes
        h = {name: jnp.einsum("blk,kd->bld", x_s, p.embedding) for p, name in
             (nets[k] for k in ("student", "teacher", "ema") if k in nets)}

    def head(a):
        return _head(a, n_diag)

    def tail(a):
        return _tail(a, n_diag)

    diag_loss = chunked.diagonal_loss(student(k_diag), nets.get("teacher"), head(h), head(tokens),
                                      head(tau_s), dc, chunk)
    r = Rows(tail(h), tail(tokens), tail(tau_s), tail(tau_u), tail(tau_t), tail(s), tail(u), tail(t))
    if dc.method == "psd":
        first, second = ((nets["ema"], nets["ema"]) if dc.use_ema_for_psd_target
                         else (student(k_target1), student(k_target2)))
        return diag_loss, chunked.psd_loss(nets["student"], first, second, r.x, r, dc, chunk), \
            jnp.ones_like(r.t, bool)
    if dc.method == "lsd":
        d_t = (nets["teacher"] if dc.use_teacher and dc.use_teacher_for_D_t_lsd
               else student(k_target1))  # the reference default: the student's own δ_{t,t}
        dtau_dt_t = schedule.dtau_dt(r.t)  # LSD's chain-rule factor, at t
        off = chunked.lsd_loss(nets["student"], nets["student_jvp"], d_t, r.x, r, dtau_dt_t,
                               dc.entmax_temp_lsd, chunk)
        return diag_loss, off, jnp.ones_like(r.t, bool)
    # ESD: D_s of the teacher, or the student's own diagonal δ_{s,s}; t = 1 rows left out.
    d_s = (*nets["teacher"], None) if dc.use_teacher else (*student(k_target1), r.tau_s)
    off = chunked.esd_loss(nets["student"], nets["student_jvp"], d_s, r.x, r, schedule.dtau_dt(r.s), chunk)
    return diag_loss, off, r.t < 1.0


def loss_terms(params, batch: dict, plan: dict, rng: jax.Array, config, teacher_params=None,
               ema_params=None, train: bool = True) -> dict:
    """{name: (sum, count)} over the rows of `batch` cut from a `rows.draw_plan` plan, whose
    first ⌊n·f⌋ rows are diagonal; `rng`: the dropout keys."""
    tokens = batch["tokens"]
    width = noise_width(params, config, teacher_params, ema_params)
    noise = interpolant.row_normal(plan["key"], (tokens.shape[1], width))
    times = (plan["tau_s"], plan["tau_u"], plan["tau_t"])
    return distill_terms_at(params, tokens, batch.get("mask"), times, noise,
                            rows_lib.diagonal_rows(tokens.shape[0], config), rng, config,
                            teacher_params, ema_params, train)


def distill_loss_at(params, tokens, mask, times, noise, n_diag: int, dropout_rng, config,
                    teacher_params=None, ema_params=None, train: bool = True):
    """(loss, metrics) for explicit times, noise and row kinds (see `distill_terms_at`)."""
    metrics = finalize(distill_terms_at(params, tokens, mask, times, noise, n_diag, dropout_rng,
                                        config, teacher_params, ema_params, train))
    return metrics["loss"], metrics


def distill_loss(params, batch: dict, rng: jax.Array, config, teacher_params=None,
                 ema_params=None, train: bool = True):
    """The FMLM distillation loss over the global batch (SPEC §5): (loss, metrics).

    config: `model` (the two-time student) and `distill` (method, use_teacher,
    diagonal_fraction, boundary_prob, offdiag_sampling, use_mse_loss_psd,
    rescale_offdiag_loss_psd, use_ema_for_psd_target, use_teacher_for_D_t_lsd,
    entmax_temp_lsd); optional `flm.projected_noise`. teacher_params: the FLM teacher's EMA
    weights, required when distill.use_teacher (otherwise self-distillation). ema_params:
    needed for use_ema_for_psd_target.
    """
    _check(params, config, teacher_params, ema_params)
    k_plan, k_dropout = jax.random.split(rng)
    plan = rows_lib.draw_plan(k_plan, batch["tokens"].shape[0], config)
    metrics = finalize(loss_terms(params, batch, plan, k_dropout, config, teacher_params, ema_params,
                                  train))
    return metrics["loss"], metrics
