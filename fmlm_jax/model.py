"""The FLM/FMLM denoiser: a DiT with one- or two-time adaLN conditioning (SPEC §3).

`DiT(config).apply({'params': p}, z, tau_s, tau_t=None, train=False, rngs=None)` maps a
noisy one-hot sequence z (B, L, K) and network times τ (B,) to raw logits (B, L, K);
`log_probs` applies the output cap. Parameter names mirror the reference PyTorch module
(SPEC §7) so that `fmlm_jax.convert` is a table, not a translation: a torch
`a.b.weight` of a Linear is the Flax `a/b/kernel` transposed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmlm_jax import config as fmlm_config
from fmlm_jax import kernels

MODEL_SIZES = fmlm_config.MODEL_SIZES
OPTIONAL_DEFAULTS = fmlm_config.MODEL_OPTIONAL_DEFAULTS
REQUIRED_KEYS = tuple(k for k in fmlm_config.model_group() if k not in OPTIONAL_DEFAULTS)

TIME_FREQUENCIES = 128  # sinusoidal time features: 128 cos + 128 sin
LOSS_WEIGHT_HIDDEN = 128  # width of the learnable loss-weighting MLP (SPEC §3.9)
ROPE_BASE = 10000.0
LN_EPS = 1e-5


def model_config(size: str = "small", vocab_size: int = 30522, **overrides) -> ml_collections.ConfigDict:
    """A complete model config for one of the SPEC sizes; `overrides` replace fields
    (`fmlm_jax.config.model_group`)."""
    return fmlm_config.model_group(size, vocab_size, **overrides)


def resolve_config(config) -> ml_collections.ConfigDict:
    """Checks a model config and fills the optional fields (absent from older checkpoints)
    with their defaults."""
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"model config lacks {missing}; build one with fmlm_jax.model.model_config()"
        )
    known = set(REQUIRED_KEYS) | set(OPTIONAL_DEFAULTS)
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        raise ValueError(f"model config has unknown fields {unknown}; known fields: {sorted(known)}")
    cfg = ml_collections.ConfigDict({**OPTIONAL_DEFAULTS, **dict(config.items())})
    if cfg.hidden_size % cfg.n_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by n_heads {cfg.n_heads}")
    if (cfg.hidden_size // cfg.n_heads) % 2:
        raise ValueError("rotary embeddings need an even head dimension")
    if cfg.attention_impl not in fmlm_config.ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl must be one of {fmlm_config.ATTENTION_IMPLS}, got "
                         f"{cfg.attention_impl!r}")
    return cfg


def log_probs(logits: jax.Array, cap: float = OPTIONAL_DEFAULTS["output_cap"]) -> jax.Array:
    """Capped log-softmax over the vocabulary: log δ = log_softmax(cap·tanh(logits/cap))."""
    logits = logits.astype(jnp.float32)
    return jax.nn.log_softmax(cap * jnp.tanh(logits / cap), axis=-1)


# ----------------------------------------------------------------------------- fused output CE
# The FLM loss needs only −log δ[x₁] per token, yet autodiff of log_probs keeps the (N, K)
# logits, their tanh and log-softmax for the backward pass and builds a (N, K) scatter for
# the gather. The fused form keeps the per-token log-sum-exp only and recomputes the capped
# logits chunk by chunk in the backward pass, where softmax − onehot, the cap's derivative
# and both matmuls fuse. Same math as log_probs; the reference computes it unfused.


def row_chunks(x: jax.Array, size: int) -> jax.Array:
    """(R, T, ...) → (T/size, R, size, ...): chunks of `size` positions along T within every
    row, T zero-padded up to a multiple of size. The row axis stays whole in each chunk, so a
    batch sharded over rows stays sharded: chunking the flattened (R·T) tokens instead makes
    XLA gather the global batch onto every device, each then doing every chunk."""
    pad = (-x.shape[1]) % size
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], x.shape[1] // size, size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def row_unchunk(y: jax.Array, length: int) -> jax.Array:
    """`row_chunks` undone: (T/size, R, size, ...) → (R, length, ...)."""
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :length]


def chunk_positions(rows: int, length: int, chunk_size: int) -> int:
    """Positions per chunk of `chunk_size` tokens over `rows` rows (≥ 1, ≤ length; 0 = all)."""
    if chunk_size <= 0:
        return length
    return max(1, min(length, int(chunk_size) // max(rows, 1)))


def _capped(x, kernel, bias, cap, dtype):
    """Capped logits cap·tanh((x·W + b)/cap) in float32, and tanh itself (for the backward)."""
    logits = jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)
    th = jnp.tanh(logits.astype(jnp.float32) / cap)
    return cap * th, th


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_nll(x, kernel, bias, tokens, cap, chunk, dtype):
    return _fused_nll_fwd(x, kernel, bias, tokens, cap, chunk, dtype)[0]


def _fused_nll_fwd(x, kernel, bias, tokens, cap, chunk, dtype):
    """x (R, T, d), tokens (R, T) → nll (R, T), chunk positions of every row at a time."""
    def one(_, xt):
        xc, tc = xt  # (R, c, d), (R, c)
        capped, _ = _capped(xc, kernel, bias, cap, dtype)
        lse = jax.nn.logsumexp(capped, axis=-1)
        target = jnp.take_along_axis(capped, tc[..., None], axis=-1)[..., 0]
        return None, (lse - target, lse)

    length = x.shape[1]
    _, (nll, lse) = jax.lax.scan(one, None, (row_chunks(x, chunk), row_chunks(tokens, chunk)))
    nll, lse = row_unchunk(nll, length), row_unchunk(lse, length)
    return nll, (x, kernel, bias, tokens, lse)


def _fused_nll_bwd(cap, chunk, dtype, residuals, g):
    x, kernel, bias, tokens, lse = residuals
    length, vocab = x.shape[1], kernel.shape[1]

    def one(acc, xtlg):
        xc, tc, lc, gc = xtlg  # (R, c, d), (R, c) × 3
        capped, th = _capped(xc, kernel, bias, cap, dtype)
        onehot = tc[..., None] == jnp.arange(vocab, dtype=tc.dtype)
        d_capped = gc[..., None] * (jnp.exp(capped - lc[..., None]) - onehot)
        d_logits = (d_capped * (1.0 - th * th)).astype(dtype)  # d(cap·tanh(l/cap))/dl
        dk, db = acc
        dk = dk + jnp.einsum("rcd,rck->dk", xc.astype(dtype), d_logits, preferred_element_type=jnp.float32)
        db = db + d_logits.astype(jnp.float32).sum((0, 1))
        dx = jnp.dot(d_logits, kernel.astype(dtype).T, preferred_element_type=jnp.float32)
        return (dk, db), dx

    acc0 = (jnp.zeros(kernel.shape, jnp.float32), jnp.zeros(bias.shape, jnp.float32))
    xs = tuple(row_chunks(a, chunk) for a in (x, tokens, lse, g))
    (dk, db), dx = jax.lax.scan(one, acc0, xs)
    dx = row_unchunk(dx, length).astype(x.dtype)
    return dx, dk.astype(kernel.dtype), db.astype(bias.dtype), None


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)


def capped_nll(features: jax.Array, kernel: jax.Array, bias: jax.Array, tokens: jax.Array,
               cap: float = OPTIONAL_DEFAULTS["output_cap"], chunk_size: int = 0,
               dtype: Any = jnp.float32) -> jax.Array:
    """Per-token −log δ[x₁] (...,) of the output Linear, fused and chunked over tokens.

    features (..., d): the final layer's modulated LN output (`DiT(..., features_only=True)`);
    kernel (d, K), bias (K,): `output_layer/linear`; tokens (...,) int. Equals
    −take(log_probs(features·W + b, cap), tokens) with the same compute dtype. chunk_size:
    tokens per chunk (0: all at once), counted over the whole batch; chunks bound the
    (chunk, K) temporaries. A chunk is a run of positions of the last leading axis in every
    row (`row_chunks`): a batch sharded over devices stays sharded, each device computing its
    rows only (with n devices each holds chunk_size/n tokens of a chunk).
    """
    if features.shape[:-1] != tokens.shape:
        raise ValueError(f"features {features.shape} and tokens {tokens.shape} must agree on the "
                         "leading (batch, length) axes")
    if features.shape[-1] != kernel.shape[0] or kernel.shape[1:] != bias.shape:
        raise ValueError(f"kernel {kernel.shape} and bias {bias.shape} do not fit features "
                         f"{features.shape}: expected kernel (d, K) and bias (K,)")
    lead = tokens.shape
    length = lead[-1] if lead else 1
    x = features.reshape(-1, length, features.shape[-1])  # (R, T, d): rows kept whole
    chunk = chunk_positions(x.shape[0], length, chunk_size)
    nll = _fused_nll(x, kernel, bias, tokens.reshape(x.shape[:2]).astype(jnp.int32), float(cap), chunk,
                     jnp.dtype(dtype))
    return nll.reshape(lead)


# ----------------------------------------------------------------------------- layers


def _torch_uniform(fan_in: int):
    """U(−1/√fan_in, 1/√fan_in): torch's default Linear weight and bias distribution."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
    """A torch-style Linear: kernel (in, out), torch default init, or zero init."""

    features: int
    use_bias: bool = True
    zero_init: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        init = nn.initializers.zeros if self.zero_init else _torch_uniform(fan_in)
        kernel = self.param("kernel", init, (fan_in, self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _layer_norm(name: str) -> nn.LayerNorm:
    # No bias, learned scale, float32 statistics (SPEC §3.4); exact two-pass variance.
    return nn.LayerNorm(
        epsilon=LN_EPS, use_bias=False, dtype=jnp.float32, use_fast_variance=False, name=name
    )


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale) + shift


class TimestepEmbedder(nn.Module):
    """τ (B,) → [cos(τ·f), sin(τ·f)] (B, 256) → Linear → SiLU → Linear (B, cond)."""

    cond_dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tau: jax.Array) -> jax.Array:
        i = jnp.arange(TIME_FREQUENCIES, dtype=jnp.float32)
        freqs = jnp.exp(-math.log(10000.0) * i / TIME_FREQUENCIES)
        args = tau.astype(jnp.float32)[:, None] * freqs[None, :]
        features = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        h = Linear(self.cond_dim, param_dtype=self.param_dtype, name="mlp_0")(features)
        return Linear(self.cond_dim, param_dtype=self.param_dtype, name="mlp_2")(nn.silu(h))


class LossWeighting(nn.Module):
    """Learnable loss weight w(τ_s) (B,) (SPEC §3.9); the last layer starts at zero."""

    cond_dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tau_s: jax.Array) -> jax.Array:
        e = TimestepEmbedder(self.cond_dim, self.param_dtype, name="s_embed")(tau_s)
        h = Linear(LOSS_WEIGHT_HIDDEN, param_dtype=self.param_dtype, name="mlp_0")(e)
        h = nn.gelu(h, approximate=False)  # exact erf GELU here, unlike the blocks
        w = Linear(1, zero_init=True, param_dtype=self.param_dtype, name="mlp_2")(h)
        return w[:, 0]


class VocabEmbed(nn.Module):
    """Input projection E (K, d): h = z·E for dense z, E[x] for token ids."""

    vocab_size: int
    hidden_size: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        # torch kaiming_uniform_(a=√5) on a (K, d) tensor is U(±1/√d).
        embedding = self.param(
            "embedding", _torch_uniform(self.hidden_size), (self.vocab_size, self.hidden_size),
            self.param_dtype,
        )
        embedding = embedding.astype(jnp.float32)
        if jnp.issubdtype(z.dtype, jnp.integer):
            return embedding[z]
        return jnp.einsum("blk,kd->bld", z.astype(jnp.float32), embedding)


def _rotary(head_dim: int, length: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin of [θ, θ] (L, head_dim), θ = pos·10000^(−2j/head_dim)."""
    j = jnp.arange(head_dim // 2, dtype=jnp.float32)
    inv_freq = ROPE_BASE ** (-2.0 * j / head_dim)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half (non-interleaved) rotary embedding on x (B, L, H, hd)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def attention_scores(q: jax.Array, k: jax.Array, softcap: float) -> jax.Array:
    """Softcapped attention scores (B, H, L, L), float32: cap·tanh(q·kᵀ/√hd / cap) (SPEC §3.4).

    q·kᵀ is accumulated in float32 whatever the dtype of q and k (SPEC §4: flash attention
    accumulates in float32; a bf16 product would round the scores to 2⁻⁹ relative before
    the softcap and the softmax)."""
    scores = jnp.einsum("blhd,bmhd->bhlm", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    return softcap * jnp.tanh(scores / softcap)


def softcap_attention(q: jax.Array, k: jax.Array, v: jax.Array, softcap: float,
                      impl: str = "xla") -> jax.Array:
    """Bidirectional attention with a logit softcap, (B, L, H, hd) → (B, L, H, hd): softmax
    over keys of `attention_scores` in float32, the weights cast to v's dtype for the
    product with v.

    impl: 'xla' (this einsum; the only one jax.jvp can differentiate) or a fused tokamax
    kernel ('xla_chunked', 'triton', 'mosaic'; `fmlm_jax.kernels`), same math."""
    if impl != "xla":
        return kernels.softcap_attention(q, k, v, softcap, impl)
    weights = jax.nn.softmax(attention_scores(q, k, softcap), axis=-1).astype(v.dtype)
    return jnp.einsum("bhlm,bmhd->blhd", weights, v)


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN modulation and gated residuals (SPEC §3.4)."""

    hidden_size: int
    n_heads: int
    mlp_ratio: int
    dropout: float
    attn_softcap: float
    dtype: Any
    param_dtype: Any
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, h, c, rope, train: bool):
        batch, length, d = h.shape
        head_dim = d // self.n_heads
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = Linear(6 * d, zero_init=True, name="adaLN_modulation", **dense)(c)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod[:, None, :], 6, axis=-1)

        a = _modulate(_layer_norm("norm1")(h), shift1, scale1)
        qkv = Linear(3 * d, use_bias=False, name="attn_qkv", **dense)(a)
        qkv = qkv.reshape(batch, length, 3, self.n_heads, head_dim)  # f = which·d + head·hd + dim
        q = _apply_rotary(qkv[:, :, 0], *rope)
        k = _apply_rotary(qkv[:, :, 1], *rope)
        o = softcap_attention(q, k, qkv[:, :, 2], self.attn_softcap, self.attention_impl)
        o = o.reshape(batch, length, d)
        o = Linear(d, use_bias=False, name="attn_out", **dense)(o)
        o = nn.Dropout(self.dropout, deterministic=not train)(o)
        h = h + (gate1 * o).astype(jnp.float32)  # the residual stream stays float32

        m = _modulate(_layer_norm("norm2")(h), shift2, scale2)
        m = Linear(self.mlp_ratio * d, name="mlp_0", **dense)(m)
        m = Linear(d, name="mlp_2", **dense)(nn.gelu(m, approximate=True))
        m = nn.Dropout(self.dropout, deterministic=not train)(m)
        return h + (gate2 * m).astype(jnp.float32)


class FinalLayer(nn.Module):
    """LN → adaLN (shift, scale) → Linear(d → K): the raw logits (SPEC §3.5)."""

    vocab_size: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h, c, features_only: bool = False):
        d = h.shape[-1]
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = Linear(2 * d, zero_init=True, name="adaLN_modulation", **dense)(c)
        shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
        x = _modulate(_layer_norm("norm_final")(h), shift, scale)
        linear = Linear(self.vocab_size, zero_init=True, name="linear", **dense)
        if features_only and not self.is_initializing():
            return x  # the caller applies `linear` itself (fused cross-entropy)
        return linear(x)


def _as_batch_times(tau, batch: int, name: str) -> jax.Array:
    # Concrete times are range-checked; traced ones (inside jit) cannot be.
    if not isinstance(tau, jax.core.Tracer):
        values = np.asarray(tau, dtype=np.float64)
        if values.size and not (np.all(values >= 0.0) and np.all(values <= 1.0)):
            raise ValueError(f"{name} must lie in [0, 1] (network times are τ), got "
                             f"values in [{values.min()}, {values.max()}]")
    tau = jnp.asarray(tau, dtype=jnp.float32)
    if tau.ndim == 0:
        return jnp.broadcast_to(tau, (batch,))
    if tau.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) or be a scalar, got {tau.shape}")
    return tau


class DiT(nn.Module):
    """The denoiser network. `config`: a model config (see `model_config`)."""

    config: Any

    def setup(self):
        cfg = resolve_config(self.config)
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.vocab_embed = VocabEmbed(cfg.vocab_size, cfg.hidden_size, param_dtype)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim, param_dtype)
        if cfg.two_time:
            self.sigma_map_prime = TimestepEmbedder(cfg.cond_dim, param_dtype)
        if cfg.learnable_loss_weighting:
            self.learnable_loss_weighting = LossWeighting(cfg.cond_dim, param_dtype)
        self.blocks = [
            DiTBlock(
                cfg.hidden_size, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.attn_softcap,
                dtype, param_dtype, cfg.attention_impl,
            )
            for _ in range(cfg.n_blocks)
        ]
        self.output_layer = FinalLayer(cfg.vocab_size, dtype, param_dtype)

    def __call__(self, z, tau_s, tau_t=None, train: bool = False, embedded: bool = False,
                 features_only: bool = False) -> jax.Array:
        """Raw logits (B, L, K), float32.

        With `features_only`, the input (B, L, d) of the final Linear `output_layer/linear`
        instead, for `capped_nll` (the fused output cross-entropy).

        z: noisy one-hot vectors (B, L, K) (any float dtype) or token ids (B, L); with
        `embedded=True`, the already projected input h = z·E (B, L, d) (SPEC §10).
        tau_s: network time τ_s (B,) or scalar. tau_t: the second time of a two-time
        model (required there); a one-time model given tau_t reuses `sigma_map` for it,
        as the reference does.
        """
        cfg = self.cfg
        dense_input = not jnp.issubdtype(z.dtype, jnp.integer)
        if embedded:
            if z.ndim != 3 or z.shape[-1] != cfg.hidden_size:
                raise ValueError(f"embedded input must be (B, L, {cfg.hidden_size}), got {z.shape}")
        elif z.ndim != (3 if dense_input else 2) or (dense_input and z.shape[-1] != cfg.vocab_size):
            raise ValueError(
                f"z must be (B, L, {cfg.vocab_size}) floats or (B, L) token ids, got "
                f"{z.shape} {z.dtype}"
            )
        batch, length = z.shape[:2]
        tau_s = _as_batch_times(tau_s, batch, "tau_s")
        if cfg.two_time and tau_t is None:
            raise ValueError("a two-time model needs tau_t; pass tau_t=tau_s for the diagonal D_s")

        e = self.sigma_map(tau_s)
        if tau_t is not None:
            tau_t = _as_batch_times(tau_t, batch, "tau_t")
            e = e + (self.sigma_map_prime if cfg.two_time else self.sigma_map)(tau_t)
        c = nn.silu(e)
        if cfg.learnable_loss_weighting and self.is_initializing():
            self.loss_weight(tau_s)  # create its parameters at init

        h = z.astype(jnp.float32) if embedded else self.vocab_embed(z)
        rope = _rotary(cfg.hidden_size // cfg.n_heads, length)
        for block in self.blocks:
            h = block(h, c, rope, train)
        if features_only:
            return self.output_layer(h, c, features_only=True)
        return self.output_layer(h, c).astype(jnp.float32)

    def loss_weight(self, tau_s) -> jax.Array:
        """w(τ_s) (B,): each token's loss ℓ becomes e^{−w}·ℓ + w (SPEC §3.9)."""
        if not self.cfg.learnable_loss_weighting:
            raise ValueError("this model has no learnable loss weighting (learnable_loss_weighting=False)")
        tau_s = jnp.atleast_1d(jnp.asarray(tau_s, jnp.float32))
        return self.learnable_loss_weighting(tau_s)


def init_params(config, rng: jax.Array, length: int = 8) -> dict:
    """Initial parameters of `DiT(config)` (a dummy (1, length) token input fixes shapes).
    The dummy pass uses 'xla' attention whatever `attention_impl` says: the parameters do not
    depend on it, and a fused kernel need not exist here nor accept the dummy shape."""
    cfg = resolve_config(config)
    cfg.attention_impl = "xla"
    z = jnp.zeros((1, length), jnp.int32)
    tau = jnp.zeros((1,), jnp.float32)
    init = jax.jit(lambda key: DiT(cfg).init(key, z, tau, tau if cfg.two_time else None))
    return init(rng)["params"]  # jitted: one compile instead of one per parameter shape


def param_shapes(config) -> dict:
    """Parameter shapes without allocating them (jax.eval_shape)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def count_params(params) -> int:
    return sum(int(math.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def denoiser_scores(params, model_config, *, train: bool = False, rng: jax.Array | None = None,
                    embedded: bool = False):
    """The network as a function `(z, τ_s, τ_t) → cap·tanh(logits/cap)` (B, L, K), float32:
    log δ up to a per-token constant, so the same argmax (samplers take their last step on it).

    The one place where parameters become a denoiser (`log_denoiser` builds on it): objectives,
    samplers and tests call these instead of writing the closure. A one-time model ignores
    τ_t. train: dropout on, with `rng` (one key per call site: make one function per site).
    embedded: z is the projected input h = z·E (B, L, d) (SPEC §10).
    """
    net = DiT(model_config)
    cfg = resolve_config(model_config)
    rngs = {"dropout": rng} if (train and rng is not None) else None

    def scores(z, tau_s, tau_t=None):
        logits = net.apply({"params": params}, z, tau_s, tau_t if cfg.two_time else None,
                           train=train, rngs=rngs, embedded=embedded)
        return cfg.output_cap * jnp.tanh(logits.astype(jnp.float32) / cfg.output_cap)

    return scores


def log_denoiser(params, model_config, *, train: bool = False, rng: jax.Array | None = None,
                 embedded: bool = False):
    """The network as a function `(z, τ_s, τ_t) → log δ (B, L, K)`, the capped log-softmax
    (SPEC §3.6); arguments as `denoiser_scores`."""
    scores = denoiser_scores(params, model_config, train=train, rng=rng, embedded=embedded)

    def log_delta(z, tau_s, tau_t=None):
        return jax.nn.log_softmax(scores(z, tau_s, tau_t), axis=-1)

    return log_delta


class DenoiserParts(NamedTuple):
    """The network split at its two vocabulary-wide ends, for losses chunked over tokens.

    log δ(z) = log_softmax(scores(trunk(z·E, τ_s, τ_t))) over the vocabulary (SPEC §3):
    embedding E (K, d) float32, the input projection (also the lift of a probability
    vector into the network's input space, SPEC §10); trunk(h, τ_s, τ_t) → features
    (B, L, d) from the projected input h (B, L, d); scores(f) → cap·tanh(logits/cap)
    (..., K) float32 for features (..., d), any number of tokens at a time.
    """

    embedding: jax.Array
    trunk: Callable
    scores: Callable


def denoiser_parts(params, model_config, *, train: bool = False, rng: jax.Array | None = None,
                   attention_impl: str | None = None) -> DenoiserParts:
    """`log_denoiser` split into (embedding, trunk, scores) (`DenoiserParts`), same math:
    the distillation losses run the trunk on the whole batch and the K-wide ends chunk by
    chunk of tokens. attention_impl overrides the config's (jvp paths need 'xla')."""
    cfg = resolve_config(model_config)
    if attention_impl is not None:
        cfg.attention_impl = attention_impl
    net = DiT(cfg)
    rngs = {"dropout": rng} if (train and rng is not None) else None
    linear = params["output_layer"]["linear"]
    dtype = jnp.dtype(cfg.dtype)

    def trunk(h, tau_s, tau_t=None):
        return net.apply({"params": params}, h, tau_s, tau_t if cfg.two_time else None, train=train,
                         rngs=rngs, embedded=True, features_only=True)

    def scores(features):
        return _capped(features, linear["kernel"], linear["bias"], cfg.output_cap, dtype)[0]

    return DenoiserParts(params["vocab_embed"]["embedding"].astype(jnp.float32), trunk, scores)


def to_host(params) -> dict:
    """Every leaf as a host numpy array (jax arrays are fetched)."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(params))


def config_json(model_config) -> dict:
    """A resolved model config as plain JSON values (for checkpoint metadata)."""
    cfg = resolve_config(model_config)
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in cfg.to_dict().items()}


def check_params(params, model_config, what: str = "params") -> None:
    """ValueError naming missing, unexpected and mis-shaped leaves unless `params` fit
    `DiT(model_config)`."""
    want = param_shapes(model_config)
    got_paths = {jax.tree_util.keystr(p): np.shape(x)
                 for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    want_paths = {jax.tree_util.keystr(p): tuple(x.shape)
                  for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    if got_paths != want_paths:
        missing = sorted(set(want_paths) - set(got_paths))[:4]
        extra = sorted(set(got_paths) - set(want_paths))[:4]
        shapes = [f"{k}: {got_paths[k]} vs {want_paths[k]}" for k in sorted(got_paths)
                  if k in want_paths and got_paths[k] != want_paths[k]][:4]
        cfg = resolve_config(model_config)
        kind = "two-time FMLM" if cfg.two_time else "one-time FLM"
        raise ValueError(f"{what} do not fit the model config ({kind}, width {cfg.hidden_size}, vocab "
                         f"{cfg.vocab_size}): missing {missing}, unexpected {extra}, shape mismatches "
                         f"{shapes}")
