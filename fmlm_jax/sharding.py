"""Device mesh and parameter partition rules (MaxText style).

Two tables decide every sharding:

- `PARAM_LOGICAL_AXES` gives each parameter leaf logical axis names from its path, e.g.
  `blocks_0/attn_qkv/kernel` (d, 3d) → ('embed', 'qkv'); 1-D leaves (biases, LayerNorm
  scales) are replicated.
- `LOGICAL_AXIS_RULES` maps logical axes to the mesh axes ('data', 'fsdp'): the batch is
  split over both; FSDP shards the 'embed' dim of a parameter (or, failing that, a
  'modulation' or 'vocab' dim). A dim whose size the mesh axis does not divide stays
  replicated, so small or odd-sized tensors never fail to shard.

Parameters are replicated over 'data' and sharded over 'fsdp'; the optimizer's moments
follow the parameters; scalars (step, counts) are replicated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")

# (regex searched in the 'a/b/c' parameter path, logical axes of a 2-D leaf), first match
# wins. Names follow fmlm_jax.model; a kernel is (in, out), an embedding (K, d).
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)learnable_loss_weighting/", (None, None)),  # a few tiny MLPs: replicate
    (r"(^|/)(sigma_map|sigma_map_prime)/mlp_0/kernel$", ("time_features", "cond")),
    (r"(^|/)(sigma_map|sigma_map_prime)/mlp_2/kernel$", ("cond", "cond")),
    (r"(^|/)vocab_embed/embedding$", ("vocab", "embed")),
    (r"(^|/)output_layer/linear/kernel$", ("embed", "vocab")),
    (r"/adaLN_modulation/kernel$", ("cond", "modulation")),
    (r"/attn_qkv/kernel$", ("embed", "qkv")),
    (r"/attn_out/kernel$", ("heads", "embed")),
    (r"/mlp_0/kernel$", ("embed", "mlp")),
    (r"/mlp_2/kernel$", ("mlp", "embed")),
)
DEFAULT_KERNEL_AXES = ("embed", "mlp")  # a 2-D leaf no pattern names

# (logical axis, mesh axis or axes or None), in priority order: for each parameter the rules
# are applied in this order, each mesh axis used at most once per tensor. So a tensor with an
# 'embed' dim is sharded along it, and 'vocab' only takes 'fsdp' when 'embed' could not.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("modulation", "fsdp"),
    ("vocab", "fsdp"),
    ("mlp", None),
    ("qkv", None),
    ("heads", None),
    ("cond", None),
    ("time_features", None),
)


# ----------------------------------------------------------------------------- mesh


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh with both axes `AxisType.Auto` (XLA propagates shardings).

    data, fsdp: axis sizes; one of them may be -1, meaning all devices the other leaves.
    devices: defaults to `jax.devices()`; their count must equal data·fsdp.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": int(data), "fsdp": int(fsdp)}
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1, got {bad}")
    if -1 in sizes.values():
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if n % fixed:
            raise ValueError(
                f"mesh {sizes} does not divide the {n} devices: {fixed} does not divide {n}; "
                f"pick axis sizes whose product divides {n}"
            )
        sizes = {k: (n // fixed if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n} are given; "
            f"use data·fsdp == {n} or -1 for one axis"
        )
    shape = (sizes["data"], sizes["fsdp"])
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dim over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",)))


# ----------------------------------------------------------------------------- rules


def path_str(path) -> str:
    """A tree path as 'blocks_0/attn_qkv/kernel'."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def logical_axes(path: str, shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axis names of one parameter leaf (None: no name, replicated)."""
    if len(shape) != 2:
        return (None,) * len(shape)  # biases, LayerNorm scales, scalars
    for pattern, axes in PARAM_LOGICAL_AXES:
        if re.search(pattern, path):
            return axes
    return DEFAULT_KERNEL_AXES


def _axis_sizes(mesh) -> Mapping[str, int] | None:
    if mesh is None:
        return None
    return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | Mapping[str, int] | None = None,
                    rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec of a tensor with logical `axes` by `rules`.

    With a mesh (or {axis: size}) and the shape, a dim is only sharded where the mesh axes'
    total size divides it; otherwise the next rule gets a chance, or it stays replicated.
    """
    known = {name for name, _ in rules}
    unknown = [a for a in axes if a is not None and a not in known]
    if unknown:
        raise ValueError(f"logical axes {unknown} have no rule; rules cover {sorted(known)}")
    sizes = _axis_sizes(mesh)
    spec: list[Any] = [None] * len(axes)
    used: set[str] = set()
    for name, target in rules:
        if target is None:
            continue
        mesh_axes = (target,) if isinstance(target, str) else tuple(target)
        if used & set(mesh_axes):
            continue
        for dim, axis in enumerate(axes):
            if axis != name or spec[dim] is not None:
                continue
            if sizes is not None and shape is not None:
                if shape[dim] % math.prod(sizes[a] for a in mesh_axes):
                    continue
            spec[dim] = target
            used |= set(mesh_axes)
            break
    return PartitionSpec(*spec)


def param_partition_specs(params_or_shapes, mesh: Mesh | Mapping[str, int] | None = None):
    """A pytree of PartitionSpec like `params` (arrays or ShapeDtypeStructs).

    mesh: a Mesh or {axis: size}, to replicate dims the mesh does not divide; without it
    the specs are the rules' intent, as if every size divided.
    """
    def spec(path, leaf):
        p = path_str(path)
        return logical_to_spec(logical_axes(p, leaf.shape), leaf.shape, mesh)

    return jax.tree_util.tree_map_with_path(spec, params_or_shapes)


def param_shardings(params_or_shapes, mesh: Mesh):
    """A pytree of NamedSharding like `params` on `mesh`."""
    specs = param_partition_specs(params_or_shapes, mesh)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(state, mesh: Mesh):
    """Shardings of a train state (arrays or ShapeDtypeStructs; `fmlm_jax.train.TrainState`).

    params and ema_params by the rules; optimizer-state subtrees shaped like the params
    (Adam's mu, nu) likewise; every other leaf (step, counts, keys) replicated.
    """
    rep = replicated(mesh)
    params = param_shardings(state.params, mesh)
    params_def = jax.tree_util.tree_structure(state.params)

    def mirrors_params(x) -> bool:
        return jax.tree_util.tree_structure(x) == params_def

    opt = jax.tree_util.tree_map(lambda x: params if mirrors_params(x) else rep,
                                 state.opt_state, is_leaf=mirrors_params)
    everything = jax.tree_util.tree_map(lambda _: rep, state)
    return everything.replace(params=params, ema_params=param_shardings(state.ema_params, mesh),
                              opt_state=opt)


def place(tree, shardings):
    """`tree` on the devices as `shardings` say (a matching pytree or one sharding)."""
    return jax.device_put(tree, shardings)
