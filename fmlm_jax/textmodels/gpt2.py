"""The GPT-2 family (gpt2, gpt2-medium, gpt2-large, gpt2-xl) as a Flax Linen causal LM.

All four share one architecture, sized by config.json (n_embd, n_layer, n_head, n_positions,
vocab_size, layer_norm_epsilon): learned absolute position embeddings, pre-LN blocks
(x + attn(ln_1(x)), then x + mlp(ln_2(x))), causal self-attention scaled by 1/√head_dim,
a tanh-approximate GELU MLP (`gelu_new`) of width 4·n_embd, a final LayerNorm and an LM head
tied to the token embedding (logits = h · wteᵀ).

    module, params, hf_config = load_gpt2("path/to/gpt2")     # or a hub name, e.g. "gpt2"
    logits = module.apply({"params": params}, input_ids, attention_mask=mask)      # (B, T, V)
    logits = module.apply({"params": params}, inputs_embeds=soft_embeds(params, probs))

The soft path feeds a distribution over tokens (B, T, V) instead of ids, differentiably.
Flax parameters (float32), one block per layer `h_{i}`; HF's Conv1D stores its weight as
(in, out), which is already a Flax Dense kernel, so no GPT-2 weight is transposed:

    wte (V, d)   wpe (n_positions, d)   ln_f {scale, bias}
    h_{i}: ln_1, c_attn (d → 3d: q | k | v), attn_proj (d → d), ln_2, c_fc (d → inner), mlp_proj

`attention`, `activation` and `layer_norm` are shared with fmlm_jax.textmodels.bert.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmlm_jax.textmodels import hf_weights

# HF activation names → functions. gelu_new / gelu_pytorch_tanh are the tanh approximation
# 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))); gelu is the exact erf form.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function an HF config names (hidden_act / activation_function)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
    # float32 statistics and output whatever the compute dtype; exact two-pass variance as torch.
    return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, use_fast_variance=False, name=name)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
              precision: Any = None) -> jax.Array:
    """Softmax attention. q, k, v (B, T, H, Dh) in the compute dtype; mask (B, 1|H, T, T) bool,
    True = may attend. Scores and softmax in float32; returns (B, T, H·Dh) in v's dtype."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    # The most negative finite float, not -inf: a row with no allowed key gives a uniform
    # softmax instead of NaN (only padding queries, whose outputs are ignored, can hit it).
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=precision)
    return out.reshape(*out.shape[:2], -1)


def check_inputs(input_ids: jax.Array | None, inputs_embeds: jax.Array | None,
                 attention_mask: jax.Array | None, width: int, max_len: int, max_name: str) -> tuple:
    """(B, T) of the inputs after the checks both models share (on static shapes: jit-safe)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids (B, T) int or inputs_embeds (B, T, d) float "
                         f"(got {'both' if input_ids is not None else 'neither'})")
    if input_ids is not None and input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {input_ids.shape}")
    if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != width):
        raise ValueError(f"inputs_embeds must be (B, T, {width}), got shape {inputs_embeds.shape}")
    batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    if length > max_len:
        raise ValueError(f"sequence length {length} exceeds the model's {max_name} = {max_len}: "
                         f"truncate or split the input to at most {max_len} tokens")
    if attention_mask is not None and attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask must be (B, T) = {(batch, length)}, got {attention_mask.shape}")
    return batch, length


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The architecture fields of a GPT-2 config.json (defaults: HF's GPT2Config = gpt2 small)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None = 4·n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        activation(self.activation_function)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> GPT2Config:
        """From a parsed config.json; fields it lacks take HF's defaults."""
        if config.get("add_cross_attention"):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=true) is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def inner(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


class GPT2Block(nn.Module):
    """One pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). x (B, T, d) float32."""

    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, precision=self.precision, name=name)  # noqa: E731
        scale = 1.0 / math.sqrt(c.n_embd // c.n_head) if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        qkv = dense(3 * c.n_embd, "c_attn")(layer_norm(c.layer_norm_epsilon, "ln_1")(x))
        q, k, v = (t.reshape(*t.shape[:2], c.n_head, -1) for t in jnp.split(qkv, 3, axis=-1))
        # The residual stream stays float32; only the matmuls run in the compute dtype.
        x = x + dense(c.n_embd, "attn_proj")(attention(q, k, v, mask, scale, self.precision))
        h = dense(c.inner, "c_fc")(layer_norm(c.layer_norm_epsilon, "ln_2")(x))
        return x + dense(c.n_embd, "mlp_proj")(activation(c.activation_function)(h))


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its tied LM head: input_ids (B, T) int or inputs_embeds (B, T, d) → logits
    (B, T, V) float32.

    attention_mask (B, T): 1 = real token, 0 = padding; padded keys are masked in addition to
    causality (positions stay 0..T-1, as in HF). dtype: the compute dtype of the matmuls
    (float32, or bfloat16 with float32 parameters, LayerNorms, softmax statistics, residual
    stream and logits). precision: passed to every matmul; on GPU/TPU float32 matmuls may use
    reduced-precision passes unless it is 'highest'. Token ids are not range-checked (jit); one
    out of range embeds as NaN.
    """

    config: GPT2Config
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None) -> jax.Array:
        c = self.config
        _, length = check_inputs(input_ids, inputs_embeds, attention_mask, c.n_embd, c.n_positions,
                                     "n_positions")
        init = nn.initializers.normal(0.02)
        wte = self.param("wte", init, (c.vocab_size, c.n_embd), jnp.float32)
        wpe = self.param("wpe", init, (c.n_positions, c.n_embd), jnp.float32)
        x = jnp.take(wte, input_ids, axis=0) if inputs_embeds is None else inputs_embeds
        x = x.astype(jnp.float32) + wpe[:length]

        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # (1, 1, T, T) causal
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]  # padded keys
        dtype = jnp.dtype(self.dtype)
        for i in range(c.n_layer):
            x = GPT2Block(c, i, dtype, self.precision, name=f"h_{i}")(x, mask)
        x = layer_norm(c.layer_norm_epsilon, "ln_f")(x)
        return jnp.einsum("btd,vd->btv", x.astype(dtype), wte.astype(dtype), precision=self.precision,
                          preferred_element_type=jnp.float32)


def soft_embeds(params: Mapping, probs: jax.Array, precision: Any = None) -> jax.Array:
    """Token embeddings of distributions over the vocabulary: probs (B, T, V) @ wte (V, d) →
    (B, T, d) float32, the `inputs_embeds` of a soft (differentiable) input. One-hot probs give
    exactly the embeddings of the ids. params: the GPT-2 parameters (or {'params': ...})."""
    params = params.get("params", params)
    return jnp.einsum("btv,vd->btd", probs.astype(jnp.float32), params["wte"], precision=precision)


# ----------------------------------------------------------------------------- checkpoints

# HF name inside block i (after `h.{i}.`) → Flax name inside `h_{i}`.
_BLOCK_NAMES = {
    "ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "bias"),
    "attn.c_attn.weight": ("c_attn", "kernel"), "attn.c_attn.bias": ("c_attn", "bias"),
    "attn.c_proj.weight": ("attn_proj", "kernel"), "attn.c_proj.bias": ("attn_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("c_fc", "kernel"), "mlp.c_fc.bias": ("c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp_proj", "kernel"), "mlp.c_proj.bias": ("mlp_proj", "bias"),
}
# Tensors old checkpoints carry that are not parameters: the causal-mask buffers.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def name_table(config: GPT2Config) -> list[tuple[str, tuple[str, ...], bool]]:
    """(HF name after hf_weights.normalize_name, Flax path, transpose) for every parameter.
    Nothing is transposed: HF's Conv1D weight is (in, out) like a Flax kernel."""
    table = [("wte.weight", ("wte",), False), ("wpe.weight", ("wpe",), False),
             ("ln_f.weight", ("ln_f", "scale"), False), ("ln_f.bias", ("ln_f", "bias"), False)]
    for i in range(config.n_layer):
        table += [(f"h.{i}.{hf}", (f"h_{i}", *path), False) for hf, path in _BLOCK_NAMES.items()]
    return table


def gpt2_params(tensors: Mapping[str, np.ndarray], config: GPT2Config, source: str = "checkpoint") -> dict:
    """Flax parameters (float32 numpy) from HF GPT-2 tensors {name: array} (a GPT2Model or
    GPT2LMHeadModel state dict as numpy; names are normalized here)."""
    tensors = {hf_weights.normalize_name(k): np.asarray(v) for k, v in tensors.items()}
    table = name_table(config)
    shapes = jax.eval_shape(GPT2LMHeadModel(config).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 1), jnp.int32))["params"]
    params = hf_weights.params_from_table(tensors, table, shapes, source)
    head = tensors.get("lm_head.weight")
    if head is not None and not np.array_equal(head, tensors["wte.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight; only GPT-2 with the LM head "
                         "tied to the token embedding (as every released GPT-2) is supported")
    extra = [n for n in hf_weights.unused(tensors, table)
             if n != "lm_head.weight" and not n.endswith(_BUFFER_SUFFIXES)]
    if extra:
        warnings.warn(f"{source}: ignoring {len(extra)} tensors GPT2LMHeadModel does not use, "
                      f"e.g. {extra[:5]}", stacklevel=2)
    return params


def load_gpt2(name_or_dir: str | os.PathLike, dtype: Any = jnp.float32,
              precision: Any = None) -> tuple[GPT2LMHeadModel, dict, dict]:
    """(module, params, hf_config) of a GPT-2 checkpoint: a local directory with config.json
    and model.safetensors / pytorch_model.bin, or a hub name ('gpt2', 'gpt2-medium', ...).
    params: float32 jax arrays for `module.apply({'params': params}, ...)`; hf_config: the
    parsed config.json (token ids, ...); module.config holds the architecture."""
    directory = hf_weights.resolve(name_or_dir)
    hf_config = hf_weights.read_config(directory)
    hf_weights.check_model_type(hf_config, "gpt2", directory)
    config = GPT2Config.from_hf(hf_config)
    params = gpt2_params(hf_weights.read_tensors(directory), config, source=directory)
    module = GPT2LMHeadModel(config, dtype=dtype, precision=precision)
    return module, jax.tree.map(jnp.asarray, params), hf_config
