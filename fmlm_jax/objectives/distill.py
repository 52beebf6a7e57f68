"""FMLM distillation of a two-time denoiser δ_{s,t} (SPEC §5).

Methods: PSD (semigroup; the released models), LSD (Lagrangian), ESD (Eulerian), each
with a pretrained FLM teacher or without one (self-distillation). The global batch of
N rows is split into diagonal rows (τ_s = τ_t, trained towards D_s), boundary rows
(τ_s, τ_t) = (0, 1) and off-diagonal rows (the method's target). Every target sits
under `stop_gradient`; derivatives are one `jax.jvp` each.

The target builders take a *log-denoiser* callable `log_delta(x, tau_s, tau_t)` →
log δ (B, L, K), so they serve the network and, in tests, an exact closed-form model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fmlm_jax import interpolant
from fmlm_jax import model as model_lib
from fmlm_jax.objectives.flm import antithetic_uniform
from fmlm_jax.schedule import Schedule

LogDenoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
METHODS = ("psd", "lsd", "esd")


# ------------------------------------------------------------------ rows and times


def split_rows(n: int, diagonal_fraction: float, boundary_prob: float) -> tuple[int, int, int]:
    """(n_diag, n_boundary, n_offdiag) over a global batch of n rows (SPEC §5).

    n_diag = ⌊n·f⌋, n_boundary = ⌊n·(f + (1−f)/P)⌋ − n_diag; the rest is off-diagonal.
    """
    f = diagonal_fraction
    n_diag = math.floor(n * f)
    n_boundary = math.floor(n * (f + (1.0 - f) / boundary_prob)) - n_diag
    return n_diag, n_boundary, n - n_diag - n_boundary


def sample_times(rng: jax.Array, n: int, config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row (τ_s, τ_u, τ_t), rows ordered [diagonal | boundary | off-diagonal].

    config: the `distill` group (diagonal_fraction, boundary_prob, offdiag_sampling).
    τ_u is the midpoint in τ (the reference's choice).
    """
    n_diag, n_bnd, n_off = split_rows(n, config.diagonal_fraction, config.boundary_prob)
    k_diag, k_a, k_b = jax.random.split(rng, 3)
    diag = antithetic_uniform(k_diag, n_diag) if n_diag else jnp.zeros((0,))
    a, b = jax.random.uniform(k_a, (n_off,)), jax.random.uniform(k_b, (n_off,))
    if config.offdiag_sampling == "uniform_diff":
        gap, start = a, b
        off_s = start * (1.0 - gap)
        off_t = off_s + gap
    elif config.offdiag_sampling == "uniform_st":
        off_s, off_t = jnp.minimum(a, b), jnp.maximum(a, b)
    else:
        raise ValueError(
            f"distill.offdiag_sampling must be 'uniform_diff' or 'uniform_st', got "
            f"{config.offdiag_sampling!r}"
        )
    tau_s = jnp.concatenate([diag, jnp.zeros((n_bnd,)), off_s])
    tau_t = jnp.concatenate([diag, jnp.ones((n_bnd,)), off_t])
    return tau_s, 0.5 * (tau_s + tau_t), tau_t


# ------------------------------------------------------------------ simplex tools


def sparsemax(z: jax.Array, axis: int = -1) -> jax.Array:
    """Euclidean projection of z onto the probability simplex (entmax with α = 2)."""
    z = jnp.moveaxis(z, axis, -1)
    z_sorted = -jnp.sort(-z, axis=-1)
    k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cumsum = jnp.cumsum(z_sorted, axis=-1)
    support = 1.0 + k * z_sorted > cumsum
    k_z = jnp.sum(support, axis=-1, keepdims=True)
    threshold = (jnp.take_along_axis(cumsum, k_z.astype(jnp.int32) - 1, axis=-1) - 1.0) / k_z
    return jnp.moveaxis(jnp.maximum(z - threshold, 0.0), -1, axis)


# ------------------------------------------------------------------ targets


def _rows(v):
    """Per-row values (B,) → (B, 1, 1) against (B, L, K)."""
    return v[:, None, None]


def _identity(delta):
    return delta


def _flow_map(x, delta, s, t, lift):
    """X_{s,t} on a state: an array z (B, L, K), or a dict of projected forms z·E_i (SPEC §10)."""
    return jax.tree_util.tree_map(lambda xi, di: interpolant.flow_map(xi, di, s, t), x, lift(delta))


def psd_target(log_delta: LogDenoiser, x_s, tau_s, tau_u, tau_t, s, u, t,
               second_pass: LogDenoiser | None = None, lift=_identity) -> jax.Array:
    """Semigroup target δ̄ = λ·δ_{s,u}(x_s) + (1−λ)·δ_{u,t}(X_{s,u}(x_s)) (no gradient).

    `second_pass` (default: log_delta) evaluates δ_{u,t}; the loss passes the same
    weights with another dropout key. `lift` maps a probability vector into the state's
    form (identity for dense states; δ ↦ {i: δ·E_i} for projected ones).
    """
    a = jnp.exp(log_delta(x_s, tau_s, tau_u))
    y = _flow_map(x_s, a, s, u, lift)
    b = jnp.exp((second_pass or log_delta)(y, tau_u, tau_t))
    lam = _rows(interpolant.semigroup_weight(s, u, t))
    return jax.lax.stop_gradient(lam * a + (1.0 - lam) * b)


def dlog_delta_dtau_t(log_delta: LogDenoiser, x, tau_s, tau_t):
    """(log δ_{s,t}(x), ∂ log δ/∂τ_t) by one forward-mode jvp (tangent 1 on τ_t)."""
    return jax.jvp(lambda tt: log_delta(x, tau_s, tt), (tau_t,), (jnp.ones_like(tau_t),))


def dlog_delta_along_flow(log_delta: LogDenoiser, x_s, tau_s, tau_t, dtau_dt_s, velocity):
    """(log δ_{s,t}(x_s), d/ds log δ_{s,t}(x_s(s))) for x moving with the flow.

    One jvp of (τ_s, x) ↦ log δ with tangents (dτ/dt(s), v_s(x_s)): the network's time
    input is τ, so the s-tangent is scaled by dτ/dt.
    """
    return jax.jvp(lambda ts, x: log_delta(x, ts, tau_t), (tau_s, x_s), (dtau_dt_s, velocity))


def lsd_target(log_delta: LogDenoiser, denoiser_t: LogDenoiser, x_s, tau_s, tau_t, s, t,
               dtau_dt_t, temperature: float = 1.0, lift=_identity):
    """Lagrangian distillation: (log δ_{s,t}(x_s) with gradient, target δ̄).

    ∂_tδ = δ ⊙ ∂P/∂τ_t · dτ/dt(t), P = log δ_{s,t}(x_s);
    δ̄ = sparsemax((D_t(X_{s,t}(x_s)) − ((t−s)(1−t)/(1−s))·∂_tδ) / temperature),
    D_t(x) = exp(denoiser_t(x, τ_t, τ_t)). Exact flow maps make δ̄ = δ_{s,t}.
    """
    log_p, dlog_p_dtau = dlog_delta_dtau_t(log_delta, x_s, tau_s, tau_t)
    delta = jax.lax.stop_gradient(jnp.exp(log_p))
    d_delta_dt = delta * jax.lax.stop_gradient(dlog_p_dtau) * _rows(dtau_dt_t)
    x_t = _flow_map(x_s, delta, s, t, lift)
    d_t = jnp.exp(denoiser_t(x_t, tau_t, tau_t))
    coeff = (t - s) * (1.0 - t) / (1.0 - s + interpolant.FLOW_MAP_EPS)
    raw = d_t - _rows(coeff) * d_delta_dt
    return log_p, jax.lax.stop_gradient(sparsemax(raw / temperature))


def esd_target(log_delta: LogDenoiser, d_s, x_s, tau_s, tau_t, s, t, dtau_dt_s, lift=_identity):
    """Eulerian distillation: (δ_{s,t}(x_s) with gradient, target δ̄).

    δ̄ = D_s + ((1−s)(t−s)/(1−t))·δ ⊙ d/ds log δ along the flow v_s = (D_s − x_s)/(1−s).
    Rows with t = 1 have no finite target (the coefficient divides by 1 − t): callers
    must mask them out (see `distill_loss`); their coefficient is set to 0 here.
    """
    velocity = jax.tree_util.tree_map(lambda xi, di: interpolant.velocity(xi, di, s), x_s, lift(d_s))
    log_p, dlog_p_ds = dlog_delta_along_flow(log_delta, x_s, tau_s, tau_t, dtau_dt_s, velocity)
    delta = jnp.exp(log_p)
    finite = t < 1.0
    coeff = jnp.where(finite, (1.0 - s) * (t - s) / jnp.where(finite, 1.0 - t, 1.0), 0.0)
    target = d_s + _rows(coeff) * jax.lax.stop_gradient(delta) * dlog_p_ds
    return delta, jax.lax.stop_gradient(target)


# ------------------------------------------------------------------ the loss


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


def _network(params, model_config, train: bool, rng: jax.Array | None,
             space: str | None = None) -> LogDenoiser:
    """log δ of the network as a LogDenoiser (fresh dropout key per call site).

    space: None for dense states z (B, L, K); else the key of this network's projected
    form z·E in a dict state (SPEC §10).
    """
    net = model_lib.DiT(model_config)
    cap = model_lib.resolve_config(model_config).output_cap
    two_time = model_config.two_time

    def log_delta(x, tau_s, tau_t):
        rngs = {"dropout": rng} if (train and rng is not None) else None
        x = x if space is None else x[space]
        logits = net.apply({"params": params}, x, tau_s, tau_t if two_time else None,
                           train=train, rngs=rngs, embedded=space is not None)
        return model_lib.log_probs(logits, cap)

    return log_delta


def projected_noise_enabled(config) -> bool:
    """The one switch for the projected-noise path (SPEC §10): `config.flm.projected_noise`."""
    flm = config.get("flm") if hasattr(config, "get") else None
    return bool(flm.get("projected_noise", False)) if flm is not None else False


def _noisy_state(tokens, s, rng, nets: dict, vocab: int, projected: bool):
    """(x_s, lift): x_s = (1−s)·ε + s·onehot(x₁) as one dense (N, L, K) array, or with
    `projected` as {name: x_s·E_name} for each network in `nets`, drawn jointly from
    ε̃ ~ N(0, I_r) through `interpolant.joint_noise_factors`. lift(δ) puts a probability
    vector in the same form (identity, or {name: δ·E_name})."""
    if not projected:
        eps = jax.random.normal(rng, (*tokens.shape, vocab), jnp.float32)
        return interpolant.noisy(tokens, s, eps), _identity
    embeddings = {name: p["vocab_embed"]["embedding"].astype(jnp.float32) for name, p in nets.items()}
    factors = dict(zip(embeddings, interpolant.joint_noise_factors(list(embeddings.values())),
                       strict=True))
    width = next(iter(factors.values())).shape[0]
    eps = jax.random.normal(rng, (*tokens.shape, width), jnp.float32)
    rows = s[:, None, None]
    x_s = {name: (1.0 - rows) * jnp.einsum("blr,rd->bld", eps, factors[name])
           + rows * embeddings[name][tokens] for name in embeddings}

    def lift(delta):
        return {name: interpolant.lift(delta, e) for name, e in embeddings.items()}

    return x_s, lift


def distill_loss(params, batch: dict, rng: jax.Array, config, teacher_params=None,
                 ema_params=None, train: bool = True):
    """The FMLM distillation loss over the global batch (SPEC §5). Returns (loss, metrics).

    config: `model` (the two-time student) and `distill` (method, use_teacher,
    diagonal_fraction, boundary_prob, offdiag_sampling, use_mse_loss_psd,
    rescale_offdiag_loss_psd, use_ema_for_psd_target, use_teacher_for_D_t_lsd,
    entmax_temp_lsd); optional `flm.projected_noise` (default False): the projected-noise
    path of SPEC §10 for student, teacher and targets. teacher_params: the FLM teacher's
    EMA weights, required when distill.use_teacher (otherwise self-distillation: data
    one-hots as diagonal targets and the student's own diagonal as D). ema_params:
    needed for use_ema_for_psd_target.
    """
    dc, mc = config.distill, config.model
    if dc.method not in METHODS:
        raise ValueError(f"distill.method must be one of {METHODS}, got {dc.method!r}")
    if dc.use_teacher and teacher_params is None:
        raise ValueError("distill.use_teacher=True but no teacher_params were given")
    tokens = batch["tokens"]
    n, length = tokens.shape
    vocab = mc.vocab_size
    n_diag, _, _ = split_rows(n, dc.diagonal_fraction, dc.boundary_prob)
    mask = batch.get("mask")
    mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    schedule = Schedule(vocab)
    k_time, k_noise, k_diag, k_off, k_target1, k_target2 = jax.random.split(rng, 6)
    if dc.use_ema_for_psd_target and ema_params is None:
        raise ValueError("distill.use_ema_for_psd_target=True but no ema_params were given")
    ema_target = dc.method == "psd" and dc.use_ema_for_psd_target
    target_params = ema_params if ema_target else params

    tau_s, tau_u, tau_t = sample_times(k_time, n, dc)
    s, u, t = schedule.tau_to_t(tau_s), schedule.tau_to_t(tau_u), schedule.tau_to_t(tau_t)
    # The networks' inputs: x_s (N, L, K), or with flm.projected_noise its projected form
    # x_s·E_i for each network i that reads it (student, teacher, EMA), drawn jointly.
    nets = {"student": params}
    if dc.use_teacher:
        nets["teacher"] = teacher_params
    if ema_target:
        nets["ema"] = ema_params
    x_s, lift = _noisy_state(tokens, s, k_noise, nets, vocab, projected_noise_enabled(config))
    space = (lambda name: name) if isinstance(x_s, dict) else (lambda name: None)

    # Student passes in train mode; every call site has its own dropout key.
    student_diag = _network(params, mc, train, k_diag, space("student"))
    student = _network(params, mc, train, k_off, space("student"))
    teacher = (_network(teacher_params, teacher_config(mc), False, None, space("teacher"))
               if dc.use_teacher else None)
    target_space = space("ema" if ema_target else "student")

    def diag_rows(a):
        return jax.tree_util.tree_map(lambda v: v[:n_diag], a)

    def off_rows(a):
        return jax.tree_util.tree_map(lambda v: v[n_diag:], a)

    # Diagonal rows: cross-entropy towards D_s (teacher) or the data one-hot.
    log_diag = student_diag(diag_rows(x_s), diag_rows(tau_s), diag_rows(tau_s))
    if dc.use_teacher:
        diag_target = jax.lax.stop_gradient(jnp.exp(teacher(diag_rows(x_s), diag_rows(tau_s), None)))
        diag_loss = -jnp.sum(diag_target * log_diag, axis=-1)  # (n_diag, L)
    else:  # −Σ onehot·log δ = −log δ[x₁], without a (B, L, K) one-hot
        diag_loss = -jnp.take_along_axis(log_diag, diag_rows(tokens)[..., None], axis=-1)[..., 0]

    # Off-diagonal and boundary rows: the method's target.
    xo, ts_, tu_, tt_ = off_rows(x_s), off_rows(tau_s), off_rows(tau_u), off_rows(tau_t)
    so, uo, to = off_rows(s), off_rows(u), off_rows(t)
    off_mask = off_rows(mask)
    if dc.method == "psd":
        # Two target passes, each with its own dropout mask (train mode, no gradient).
        first = _network(target_params, mc, train, k_target1, target_space)
        second = _network(target_params, mc, train, k_target2, target_space)
        target = psd_target(first, xo, ts_, tu_, tt_, so, uo, to, second_pass=second, lift=lift)
        log_off = student(xo, ts_, tt_)
        if dc.use_mse_loss_psd:
            off_loss = jnp.sum((jnp.exp(log_off) - target) ** 2, axis=-1)
        else:
            off_loss = -jnp.sum(target * log_off, axis=-1)
        if dc.rescale_offdiag_loss_psd:
            off_loss = off_loss * (((to - so) / (1.0 - so + interpolant.FLOW_MAP_EPS)) ** 2)[:, None]
    elif dc.method == "lsd":
        if dc.use_teacher and dc.use_teacher_for_D_t_lsd:
            d_t_net = lambda x, a, b: teacher(x, a, None)  # noqa: E731
        else:  # the reference default: the student's own diagonal δ_{t,t}
            d_t_net = _network(params, mc, train, k_target1, space("student"))
        log_off, target = lsd_target(student, d_t_net, xo, ts_, tt_, so, to,
                                     schedule.dtau_dt(to), dc.entmax_temp_lsd, lift=lift)
        off_loss = -jnp.sum(target * log_off, axis=-1)
    else:  # esd
        if dc.use_teacher:
            d_s = jnp.exp(teacher(xo, ts_, None))
        else:  # the student's own diagonal δ_{s,s} (the reference wrongly uses δ_{s,t})
            d_s = jnp.exp(_network(params, mc, train, k_target1, space("student"))(xo, ts_, ts_))
        d_s = jax.lax.stop_gradient(d_s)
        delta, target = esd_target(student, d_s, xo, ts_, tt_, so, to, schedule.dtau_dt(so),
                                   lift=lift)
        off_loss = jnp.sum((delta - target) ** 2, axis=-1)
        # Boundary rows (t = 1) have no finite Eulerian target: they are excluded from
        # the loss and its normalisation (the reference divides by 1e-8 there).
        off_mask = off_mask * (to < 1.0)[:, None]

    per_token = jnp.concatenate([diag_loss, off_loss], axis=0)  # (N, L)
    full_mask = jnp.concatenate([diag_rows(mask), off_mask], axis=0)
    if mc.learnable_loss_weighting:
        w = model_lib.DiT(mc).apply({"params": params}, tau_s, method=model_lib.DiT.loss_weight)
        weighted = jnp.exp(-w)[:, None] * per_token + w[:, None]
    else:
        weighted = per_token
    loss = (weighted * full_mask).sum() / jnp.maximum(full_mask.sum(), 1.0)
    metrics = {
        "loss": loss,
        "diag_loss": (diag_loss * diag_rows(mask)).sum() / jnp.maximum(diag_rows(mask).sum(), 1.0),
        "offdiag_loss": (off_loss * off_mask).sum() / jnp.maximum(off_mask.sum(), 1.0),
    }
    return loss, metrics
