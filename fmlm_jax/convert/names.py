"""The one name table between the reference PyTorch DiT and ours (SPEC §7), in both directions.

`reference_names(config)` lists every reference tensor in the reference parameter order
(= the order of the EMA `shadow_params` list) with its Flax path and whether the tensor is
transposed (torch Linear weights are (out, in), Flax kernels (in, out)). Reading and writing
reference checkpoints (`torch_io`) use this table and nothing else.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

import numpy as np

from fmlm_jax import model as model_lib

ROTARY_BUFFER = "rotary_emb.inv_freq"  # a buffer, not a parameter: not in the table
TIME_FEATURES = 2 * model_lib.TIME_FREQUENCIES

_LINEAR = (("weight", "kernel", True), ("bias", "bias", False))
_LINEAR_NO_BIAS = (("weight", "kernel", True),)
_NORM = (("weight", "scale", False),)


def _entries(torch_prefix: str, flax_prefix: tuple[str, ...], leaves) -> list:
    return [
        (f"{torch_prefix}.{t}", (*flax_prefix, f), transpose) for t, f, transpose in leaves
    ]


def _time_embedder(torch_prefix: str, flax_prefix: tuple[str, ...]) -> list:
    return _entries(f"{torch_prefix}.mlp.0", (*flax_prefix, "mlp_0"), _LINEAR) + _entries(
        f"{torch_prefix}.mlp.2", (*flax_prefix, "mlp_2"), _LINEAR
    )


def reference_names(config) -> list[tuple[str, tuple[str, ...], bool]]:
    """[(torch name, flax path, transpose)] in the reference `named_parameters()` order."""
    cfg = model_lib.resolve_config(config)
    table = [("vocab_embed.embedding", ("vocab_embed", "embedding"), False)]
    table += _time_embedder("sigma_map", ("sigma_map",))
    if cfg.two_time:
        table += _time_embedder("sigma_map_prime", ("sigma_map_prime",))
    if cfg.learnable_loss_weighting:
        llw = ("learnable_loss_weighting",)
        table += _time_embedder("learnable_loss_weighting.s_embed", (*llw, "s_embed"))
        table += _entries("learnable_loss_weighting.mlp.0", (*llw, "mlp_0"), _LINEAR)
        table += _entries("learnable_loss_weighting.mlp.2", (*llw, "mlp_2"), _LINEAR)
    for i in range(cfg.n_blocks):
        t, f = f"blocks.{i}", (f"blocks_{i}",)
        table += _entries(f"{t}.norm1", (*f, "norm1"), _NORM)
        table += _entries(f"{t}.attn_qkv", (*f, "attn_qkv"), _LINEAR_NO_BIAS)
        table += _entries(f"{t}.attn_out", (*f, "attn_out"), _LINEAR_NO_BIAS)
        table += _entries(f"{t}.norm2", (*f, "norm2"), _NORM)
        table += _entries(f"{t}.mlp.0", (*f, "mlp_0"), _LINEAR)
        table += _entries(f"{t}.mlp.2", (*f, "mlp_2"), _LINEAR)
        table += _entries(f"{t}.adaLN_modulation", (*f, "adaLN_modulation"), _LINEAR)
    out = ("output_layer",)
    table += _entries("output_layer.norm_final", (*out, "norm_final"), _NORM)
    table += _entries("output_layer.linear", (*out, "linear"), _LINEAR)
    table += _entries("output_layer.adaLN_modulation", (*out, "adaLN_modulation"), _LINEAR)
    return table


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; torch stays an optional dependency
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def params_from_state_dict(state_dict: Mapping[str, object], config) -> dict:
    """Flax params for `DiT(config)` from reference-named tensors (no `backbone.` prefix).

    Every tensor the table names must be present with the expected shape, and no
    parameter may be left over; otherwise ValueError says which.
    """
    table = reference_names(config)
    expected = {name for name, _, _ in table}
    missing = [name for name, _, _ in table if name not in state_dict]
    extra = sorted(set(state_dict) - expected)
    if missing or extra:
        raise ValueError(
            f"state dict does not match the model config: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
            f"{'...' if len(extra) > 8 else ''}"
        )
    shapes = model_lib.param_shapes(config)
    params: dict = {}
    for name, path, transpose in table:
        value = to_numpy(state_dict[name])
        value = value.T if transpose else value
        want = _lookup(shapes, path).shape
        if value.shape != want:
            raise ValueError(
                f"{name}: shape {tuple(value.T.shape if transpose else value.shape)} does not "
                f"match the model config (expects {tuple(want[::-1] if transpose else want)})"
            )
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)
    return params


def state_dict_from_params(params: Mapping, config) -> collections.OrderedDict:
    """Reference-named numpy arrays in reference order from Flax params."""
    return collections.OrderedDict(
        (name, np.ascontiguousarray(np.asarray(_lookup(params, path)).T if transpose
                                    else np.asarray(_lookup(params, path))))
        for name, path, transpose in reference_names(config)
    )


def _lookup(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def describe_layout(config) -> str:
    """'FLM (one-time), 130 tensors' and the like."""
    cfg = model_lib.resolve_config(config)
    name = "FMLM (two-time)" if cfg.two_time else "FLM (one-time)"
    if cfg.learnable_loss_weighting:
        name += " + learnable loss weighting"
    return f"{name}, {len(reference_names(cfg))} tensors"


def rotary_inv_freq(head_dim: int) -> np.ndarray:
    """The reference buffer 1/10000^(2j/head_dim), j < head_dim/2, float32 as torch computes it."""
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.float32(model_lib.ROPE_BASE) ** exponent).astype(np.float32)


