"""A BERT encoder (BertModel) and its sequence-classification head, as Flax Linen modules.

Embeddings: word + absolute position + token-type, then LayerNorm (eps from config.json,
1e-12 for BERT). Post-LN encoder layers: x = LN(x + attn(x)), then x = LN(x + W₂·gelu(W₁·x))
with the exact erf GELU; bidirectional attention with padded keys masked. Pooler:
tanh(Linear(h[:, 0])) (the [CLS] position). BertForSequenceClassification: Linear(hidden,
num_labels) on the pooled output (its dropout is inactive at inference).

    module, params, hf_config = load_bert("path/to/checkpoint")   # BertModel or ...ForSequenceClassification
    out = module.apply({"params": params}, input_ids, attention_mask=mask)
    out.last_hidden_state (B, T, d), out.pooled_output (B, d), out.logits (B, num_labels) | None

`inputs_embeds` (B, T, d) replaces the word-embedding lookup (position and token-type
embeddings are still added, as in HF); `soft_embeds(params, probs)` makes them from a
distribution over tokens (B, T, V), differentiably. HF's Linear weights are (out, in):
they are transposed into Flax kernels. Flax parameters (float32):

    word_embeddings (V, d)  position_embeddings (P, d)  token_type_embeddings (types, d)  embeddings_norm
    layer_{i}: query, key, value, attention_out, attention_norm, intermediate, output, output_norm
    pooler (absent for a checkpoint saved without one)
    the classifier: {'bert': <the above>, 'classifier': {kernel, bias}}
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmlm_jax.textmodels import hf_weights
from fmlm_jax.textmodels.gpt2 import activation, attention, check_inputs, layer_norm


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a BERT config.json (defaults: HF's BertConfig = bert-base)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    add_pooling_layer: bool = True  # a checkpoint without pooler weights sets False
    num_labels: int = 2  # the classifier's outputs (from id2label / num_labels)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        activation(self.hidden_act)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **overrides) -> BertConfig:
        """From a parsed config.json; fields it lacks take HF's defaults. num_labels: the
        length of id2label if given, else num_labels, else 2 (as HF)."""
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {config['position_embedding_type']!r} is not "
                             "supported; only 'absolute' (every released BERT)")
        if config.get("is_decoder"):
            raise ValueError("BERT as a decoder (is_decoder=true: causal attention) is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in config.items() if k in names}
        if "id2label" in config:
            fields["num_labels"] = len(config["id2label"])
        return cls(**{**fields, **overrides})


class BertOutput(NamedTuple):
    """last_hidden_state (B, T, d); pooled_output (B, d) or None without a pooler; logits
    (B, num_labels) for the classifier, else None. All float32."""

    last_hidden_state: jax.Array
    pooled_output: jax.Array | None
    logits: jax.Array | None = None


class BertLayer(nn.Module):
    """One post-LN encoder layer. x (B, T, d) float32, mask (B, 1, 1, T) bool."""

    config: BertConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, precision=self.precision, name=name)  # noqa: E731
        heads = lambda t: t.reshape(*t.shape[:2], c.num_attention_heads, -1)  # noqa: E731
        q, k, v = (heads(dense(c.hidden_size, name)(x)) for name in ("query", "key", "value"))
        a = attention(q, k, v, mask, 1.0 / math.sqrt(c.hidden_size // c.num_attention_heads), self.precision)
        x = layer_norm(c.layer_norm_eps, "attention_norm")(x + dense(c.hidden_size, "attention_out")(a))
        h = activation(c.hidden_act)(dense(c.intermediate_size, "intermediate")(x))
        return layer_norm(c.layer_norm_eps, "output_norm")(x + dense(c.hidden_size, "output")(h))


class BertModel(nn.Module):
    """BERT: input_ids (B, T) int or inputs_embeds (B, T, d) → BertOutput (logits None).

    attention_mask (B, T): 1 = real token, 0 = padding (padded keys masked); token_type_ids
    (B, T), default zeros. dtype: the compute dtype of the matmuls (float32, or bfloat16 with
    float32 parameters, LayerNorms, softmax statistics and outputs). precision: passed to every
    matmul ('highest' for float32 parity on GPU/TPU). Token ids are not range-checked (jit); one
    out of range embeds as NaN.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None) -> BertOutput:
        c = self.config
        batch, length = check_inputs(input_ids, inputs_embeds, attention_mask, c.hidden_size,
                                     c.max_position_embeddings, "max_position_embeddings")
        init = nn.initializers.normal(0.02)
        words = self.param("word_embeddings", init, (c.vocab_size, c.hidden_size), jnp.float32)
        positions = self.param("position_embeddings", init, (c.max_position_embeddings, c.hidden_size),
                               jnp.float32)
        types = self.param("token_type_embeddings", init, (c.type_vocab_size, c.hidden_size), jnp.float32)
        x = jnp.take(words, input_ids, axis=0) if inputs_embeds is None else inputs_embeds
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch, length), jnp.int32)
        x = x.astype(jnp.float32) + jnp.take(types, token_type_ids, axis=0) + positions[:length]
        x = layer_norm(c.layer_norm_eps, "embeddings_norm")(x)

        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool)
        mask = attention_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, T): padded keys
        for i in range(c.num_hidden_layers):
            x = BertLayer(c, jnp.dtype(self.dtype), self.precision, name=f"layer_{i}")(x, mask)
        pooled = None
        if c.add_pooling_layer:
            pooler = nn.Dense(c.hidden_size, dtype=self.dtype, precision=self.precision, name="pooler")
            pooled = jnp.tanh(pooler(x[:, 0]).astype(jnp.float32))
        return BertOutput(x, pooled)


class BertForSequenceClassification(nn.Module):
    """BertModel (under 'bert') + Linear(hidden, num_labels) on the pooled output: same inputs
    as BertModel; BertOutput with logits (B, num_labels) float32."""

    config: BertConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None,
                 inputs_embeds: jax.Array | None = None) -> BertOutput:
        if not self.config.add_pooling_layer:
            raise ValueError("BertForSequenceClassification needs the pooler (add_pooling_layer=True)")
        out = BertModel(self.config, self.dtype, self.precision, name="bert")(
            input_ids, attention_mask, token_type_ids, inputs_embeds)
        classifier = nn.Dense(self.config.num_labels, dtype=self.dtype, precision=self.precision,
                              name="classifier")
        return out._replace(logits=classifier(out.pooled_output).astype(jnp.float32))


def soft_embeds(params: Mapping, probs: jax.Array, precision: Any = None) -> jax.Array:
    """Word embeddings of distributions over the vocabulary: probs (B, T, V) @ word_embeddings
    (V, d) → (B, T, d) float32, the `inputs_embeds` of a soft (differentiable) input. params:
    BertModel or classifier parameters (or {'params': ...})."""
    params = params.get("params", params)
    params = params.get("bert", params)
    return jnp.einsum("btv,vd->btd", probs.astype(jnp.float32), params["word_embeddings"],
                      precision=precision)


# ----------------------------------------------------------------------------- checkpoints

# HF name inside encoder layer i (after `encoder.layer.{i}.`) → Flax module inside `layer_{i}`.
_LAYER_MODULES = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attention_out", "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate", "output.dense": "output", "output.LayerNorm": "output_norm",
}


def _module_entries(hf: str, flax: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], bool]]:
    """A Linear (weight (out, in) → kernel, transposed) or LayerNorm (weight → scale) and its bias."""
    if hf.endswith("LayerNorm"):
        return [(f"{hf}.weight", (*flax, "scale"), False), (f"{hf}.bias", (*flax, "bias"), False)]
    return [(f"{hf}.weight", (*flax, "kernel"), True), (f"{hf}.bias", (*flax, "bias"), False)]


def name_table(config: BertConfig, classifier: bool = False) -> list[tuple[str, tuple[str, ...], bool]]:
    """(HF name after hf_weights.normalize_name, Flax path, transpose) for every parameter of
    BertModel, or of BertForSequenceClassification (BertModel under 'bert')."""
    table = [("embeddings.word_embeddings.weight", ("word_embeddings",), False),
             ("embeddings.position_embeddings.weight", ("position_embeddings",), False),
             ("embeddings.token_type_embeddings.weight", ("token_type_embeddings",), False),
             *_module_entries("embeddings.LayerNorm", ("embeddings_norm",))]
    for i in range(config.num_hidden_layers):
        for hf, flax in _LAYER_MODULES.items():
            table += _module_entries(f"encoder.layer.{i}.{hf}", (f"layer_{i}", flax))
    if config.add_pooling_layer:
        table += _module_entries("pooler.dense", ("pooler",))
    if classifier:
        table = [(hf, ("bert", *path), t) for hf, path, t in table]
        table += _module_entries("classifier", ("classifier",))
    return table


def bert_params(tensors: Mapping[str, np.ndarray], config: BertConfig, classifier: bool = False,
                source: str = "checkpoint") -> dict:
    """Flax parameters (float32 numpy) from HF BERT tensors {name: array} (a BertModel or
    BertForSequenceClassification state dict as numpy; names are normalized here)."""
    tensors = {hf_weights.normalize_name(k): np.asarray(v) for k, v in tensors.items()}
    table = name_table(config, classifier)
    module = (BertForSequenceClassification if classifier else BertModel)(config)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))["params"]
    params = hf_weights.params_from_table(tensors, table, shapes, source)
    extra = [n for n in hf_weights.unused(tensors, table) if classifier or not n.startswith("classifier.")]
    if extra:
        warnings.warn(f"{source}: ignoring {len(extra)} tensors the model does not use, e.g. {extra[:5]}",
                      stacklevel=2)
    return params


def load_bert(name_or_dir: str | os.PathLike, dtype: Any = jnp.float32, precision: Any = None,
              head: str = "auto") -> tuple[BertModel | BertForSequenceClassification, dict, dict]:
    """(module, params, hf_config) of a BERT checkpoint: a local directory with config.json and
    model.safetensors / pytorch_model.bin, or a hub name.

    head: 'auto' (the classifier if the checkpoint has classifier weights, else BertModel),
    'base' (BertModel, ignoring any head) or 'classifier'. params: float32 jax arrays for
    `module.apply({'params': params}, ...)`; hf_config: the parsed config.json (id2label, ...).
    """
    if head not in ("auto", "base", "classifier"):
        raise ValueError(f"head must be 'auto', 'base' or 'classifier', got {head!r}")
    directory = hf_weights.resolve(name_or_dir)
    hf_config = hf_weights.read_config(directory)
    hf_weights.check_model_type(hf_config, "bert", directory)
    tensors = hf_weights.read_tensors(directory)
    classifier = head == "classifier" or (head == "auto" and "classifier.weight" in tensors)
    # A BertModel saved without its pooler has no pooler weights; the classifier needs them.
    config = BertConfig.from_hf(hf_config, add_pooling_layer=classifier or "pooler.dense.weight" in tensors)
    params = bert_params(tensors, config, classifier, source=directory)
    module = (BertForSequenceClassification if classifier else BertModel)(config, dtype, precision)
    return module, jax.tree.map(jnp.asarray, params), hf_config
