"""The distillation terms chunked over tokens: no (N, L, K) tensor is live at once (SPEC §5).

The unchunked terms (loss.py) build every probability vector of the batch — targets, teacher
D_s, the student's log δ and their gradients, each (N, L, K) float32: 206 MB per OWT
sequence apiece. Here each network runs its trunk (`model.denoiser_parts`) on the whole
batch, giving features (N, L, d), and everything K-wide runs chunk by chunk of tokens:
scores → probabilities → targets → the per-token loss, under `jax.checkpoint` so the
backward pass recomputes a chunk instead of keeping it (as the fused output cross-entropy
of FLM does, `model.capped_nll`).

Inputs are the projected forms h = x·E (N, L, d) of each network (SPEC §10): with dense noise
h = x_s·E (the same float32 product as the network's own input layer); a state built from
a probability vector δ, X_{s,u}(x_s) = a·x_s + b·δ, is a·(x_s·E) + b·(δ·E), δ·E lifted chunk
by chunk. Same math as loss.py to float32 rounding (tests/test_distill.py).

LSD and ESD differentiate the student forward in time (one `jax.jvp`); a fused attention
kernel is a custom-VJP function that jax.jvp cannot go through, so their jvp runs the trunk
with attention_impl='xla' (same weights and dropout key) and, when the configured kernel
differs, the differentiated student forward is a second trunk pass with that kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmlm_jax import interpolant
from fmlm_jax import model as model_lib
from fmlm_jax.objectives.distill import targets

# Tokens per chunk and device (`distill.chunk_size` overrides, counted over the whole batch;
# 0 = unchunked, loss.py): it bounds the (chunk, K) temporaries. 1024 × 50258 float32 is
# 0.2 GB, a few of them live per chunk. A chunk spans the whole (sharded) batch
# (`token_map`), hence the default times the device count.
CHUNK_SIZE = {"cpu": 256}


def default_chunk_size() -> int:
    return CHUNK_SIZE.get(jax.default_backend(), 1024) * jax.device_count()


def chunk_size(config) -> int:
    """Tokens per chunk of the distillation loss; 0 = unchunked."""
    value = config.distill.get("chunk_size", None)
    return default_chunk_size() if value is None else int(value)


def per_token(values: jax.Array, length: int) -> jax.Array:
    """Per-row values (N,) → (N, L)."""
    return jnp.broadcast_to(values[:, None], (values.shape[0], length))


def token_map(fn, chunk: int, *arrays):
    """fn over chunks of tokens of (N, L, ...) arrays → (N, L, ...) outputs.

    A chunk is a run of positions of every row (`model.row_chunks`), `chunk` tokens in all
    (chunk // N positions, at least one): the row axis stays whole, so a batch sharded over
    devices stays sharded and each device maps its own rows only. fn(*chunks) takes the
    chunk's tokens flattened, (c, ...) slices of every array, and returns (c, ...) per-token
    values; it runs under `jax.checkpoint` inside `lax.map`, so only its inputs are kept for
    the backward pass and the (c, K) temporaries are recomputed there.
    """
    n, length = arrays[0].shape[:2]
    positions = model_lib.chunk_positions(n, length, max(1, int(chunk)))

    def one(xs):
        flat = fn(*(a.reshape(-1, *a.shape[2:]) for a in xs))  # (N, p, ...) → (N·p, ...)
        return jax.tree_util.tree_map(lambda o: o.reshape(n, positions, *o.shape[1:]), flat)

    out = jax.lax.map(jax.checkpoint(one), tuple(model_lib.row_chunks(a, positions) for a in arrays))
    return jax.tree_util.tree_map(lambda o: model_lib.row_unchunk(o, length), out)


def probs(scores: jax.Array) -> jax.Array:
    return jnp.exp(jax.nn.log_softmax(scores, axis=-1))


def lift(parts: model_lib.DenoiserParts, features: jax.Array, embedding: jax.Array, chunk: int):
    """δ·E (N, L, d) for δ = softmax(parts.scores(features)), no gradient, chunk by chunk."""
    features = jax.lax.stop_gradient(features)
    return token_map(lambda f: probs(parts.scores(f)) @ embedding, chunk, features)


def ce_or_mse(log_p: jax.Array, target: jax.Array, mse: bool) -> jax.Array:
    """Per-token −Σ target·log δ, or Σ(δ − target)² (c,)."""
    if mse:
        return jnp.sum((jnp.exp(log_p) - target) ** 2, axis=-1)
    return -jnp.sum(target * log_p, axis=-1)


def diagonal_loss(student, teacher, h, tokens, tau, dc, chunk: int) -> jax.Array:
    """Per-token loss (n, L) of the diagonal rows towards D_s (teacher) or the data one-hot:
    −Σ target·log δ_{s,s}, or Σ(δ_{s,s} − target)² with PSD's use_mse_loss_psd (loss.py
    `_diagonal_term`). student, teacher: (DenoiserParts, name) pairs; h: {name: (n, L, d)}."""
    (s_parts, s_name), mse = student, dc.method == "psd" and dc.use_mse_loss_psd
    f = s_parts.trunk(h[s_name], tau, tau)
    if teacher is None:  # self-distillation: the data one-hot
        def one(fc, tc):
            log_p = jax.nn.log_softmax(s_parts.scores(fc), axis=-1)
            if mse:
                onehot = jax.nn.one_hot(tc, log_p.shape[-1], dtype=log_p.dtype)
                return jnp.sum((jnp.exp(log_p) - onehot) ** 2, axis=-1)
            return -jnp.take_along_axis(log_p, tc[:, None], axis=-1)[:, 0]
        return token_map(one, chunk, f, tokens)
    t_parts, t_name = teacher
    f_teacher = jax.lax.stop_gradient(t_parts.trunk(h[t_name], tau, None))

    def one(fc, ftc):
        target = jax.lax.stop_gradient(probs(t_parts.scores(ftc)))
        return ce_or_mse(jax.nn.log_softmax(s_parts.scores(fc), axis=-1), target, mse)

    return token_map(one, chunk, f, f_teacher)


def psd_loss(student, first, second, h, r, dc, chunk: int) -> jax.Array:
    """PSD (n, L): δ̄ = λ·δ_{s,u}(x_s) + (1−λ)·δ_{u,t}(X_{s,u}(x_s)), loss −Σ δ̄·log δ_{s,t}
    or Σ(δ − δ̄)² (SPEC §5; loss.py `_psd_term`). first, second: the target networks
    (DenoiserParts, name) of the two passes; r: the rows (loss.Rows, x = h)."""
    (s_parts, s_name), (a_parts, a_name), (b_parts, b_name) = student, first, second
    length = r.tokens.shape[1]
    f_a = jax.lax.stop_gradient(a_parts.trunk(h[a_name], r.tau_s, r.tau_u))
    y = interpolant.flow_map(h[b_name], lift(a_parts, f_a, b_parts.embedding, chunk), r.s, r.u)
    f_b = jax.lax.stop_gradient(b_parts.trunk(y, r.tau_u, r.tau_t))
    f = s_parts.trunk(h[s_name], r.tau_s, r.tau_t)
    lam = per_token(interpolant.semigroup_weight(r.s, r.u, r.t), length)

    def one(fc, fac, fbc, lc):
        a, b = probs(a_parts.scores(fac)), probs(b_parts.scores(fbc))
        target = jax.lax.stop_gradient(lc[:, None] * a + (1.0 - lc[:, None]) * b)
        return ce_or_mse(jax.nn.log_softmax(s_parts.scores(fc), axis=-1), target, dc.use_mse_loss_psd)

    loss = token_map(one, chunk, f, f_a, f_b, lam)
    if dc.rescale_offdiag_loss_psd:
        loss = loss * (((r.t - r.s) / (1.0 - r.s + interpolant.FLOW_MAP_EPS)) ** 2)[:, None]
    return loss


def _log_softmax_jvp(parts, f, df):
    """(log δ, its tangent) (c, K) of features f with tangent df (c, d)."""
    return jax.jvp(lambda x: jax.nn.log_softmax(parts.scores(x), axis=-1), (f,), (df,))


def lsd_loss(student, student_jvp, d_t, h, r, dtau_dt_t, alpha: float, chunk: int) -> jax.Array:
    """LSD (n, L): δ̄ = entmax_α(D_t(X_{s,t}(x_s)) − ((t−s)(1−t)/(1−s))·∂_tδ), ∂_tδ = δ ⊙ ∂P/∂τ_t
    · dτ/dt(t); loss −Σ δ̄·log δ_{s,t} (SPEC §5; targets.lsd_target). student_jvp: the
    student's trunk with XLA attention (the jvp path); student: the differentiated one."""
    (s_parts, s_name), (j_parts, _), (d_parts, d_name) = student, student_jvp, d_t
    length = r.tokens.shape[1]
    f, df = jax.jvp(lambda tt: j_parts.trunk(h[s_name], r.tau_s, tt), (r.tau_t,), (jnp.ones_like(r.tau_t),))
    if s_parts is not j_parts:  # a fused kernel: the differentiated pass is its own
        f, df = s_parts.trunk(h[s_name], r.tau_s, r.tau_t), jax.lax.stop_gradient(df)
    x_t = interpolant.flow_map(h[d_name], lift(s_parts, f, d_parts.embedding, chunk), r.s, r.t)
    f_d = jax.lax.stop_gradient(d_parts.trunk(x_t, r.tau_t, r.tau_t))
    coeff = per_token((r.t - r.s) * (1.0 - r.t) / (1.0 - r.s + interpolant.FLOW_MAP_EPS) * dtau_dt_t,
                      length)

    def one(fc, dfc, fdc, cc):
        log_p = jax.nn.log_softmax(s_parts.scores(fc), axis=-1)
        _, dlog_p = _log_softmax_jvp(s_parts, jax.lax.stop_gradient(fc), dfc)
        delta = jax.lax.stop_gradient(jnp.exp(log_p))
        raw = probs(d_parts.scores(fdc)) - cc[:, None] * delta * dlog_p
        return -jnp.sum(jax.lax.stop_gradient(targets.entmax(raw, alpha)) * log_p, axis=-1)

    return token_map(one, chunk, f, jax.lax.stop_gradient(df), f_d, coeff)


def esd_loss(student, student_jvp, d_s, h, r, dtau_dt_s, chunk: int) -> jax.Array:
    """ESD (n, L): δ̄ = D_s + ((1−s)(t−s)/(1−t))·δ ⊙ d/ds log δ along v = (D_s − x_s)/(1−s),
    loss Σ(δ − δ̄)² (SPEC §5; targets.esd_target); the coefficient is 0 on t = 1 rows (the
    caller masks them). d_s: (DenoiserParts, name, τ_t of D_s or None) of D_s's network."""
    (s_parts, s_name), (j_parts, _), (ds_parts, ds_name, ds_tau_t) = student, student_jvp, d_s
    length = r.tokens.shape[1]
    f_ds = jax.lax.stop_gradient(ds_parts.trunk(h[ds_name], r.tau_s, ds_tau_t))
    h_s = h[s_name]
    ds_lifted = lift(ds_parts, f_ds, s_parts.embedding, chunk)
    velocity = jax.lax.stop_gradient(interpolant.velocity(h_s, ds_lifted, r.s))  # v_s·E
    f, df = jax.jvp(lambda ts, x: j_parts.trunk(x, ts, r.tau_t), (r.tau_s, h_s), (dtau_dt_s, velocity))
    if s_parts is not j_parts:  # a fused kernel: the differentiated pass is its own
        f, df = s_parts.trunk(h_s, r.tau_s, r.tau_t), jax.lax.stop_gradient(df)
    finite = r.t < 1.0
    coeff = jnp.where(finite, (1.0 - r.s) * (r.t - r.s) / jnp.where(finite, 1.0 - r.t, 1.0), 0.0)

    def one(fc, dfc, fdc, cc):
        delta = probs(s_parts.scores(fc))
        _, dlog_p = _log_softmax_jvp(s_parts, jax.lax.stop_gradient(fc), dfc)
        target = probs(ds_parts.scores(fdc)) + cc[:, None] * jax.lax.stop_gradient(delta) * dlog_p
        return jnp.sum((delta - jax.lax.stop_gradient(target)) ** 2, axis=-1)

    return token_map(one, chunk, f, jax.lax.stop_gradient(df), f_ds, per_token(coeff, length))
