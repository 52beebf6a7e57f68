"""Fused softcap attention from a maintained kernel library (tokamax), an optional extra.

`model.attention_impl` chooses how the DiT computes softmax(cap·tanh(q·kᵀ/√hd / cap))·v
(SPEC §3.4):

  'xla'          our einsum (`fmlm_jax.model.softcap_attention`): float32 scores, the default
                 on every platform and the only path forward-mode autodiff (jax.jvp) can go
                 through;
  'xla_chunked'  tokamax's memory-efficient XLA attention (any platform);
  'triton'       tokamax's Pallas/Triton flash attention (NVIDIA GPU);
  'mosaic'       tokamax's Pallas/Mosaic flash attention (TPU; Hopper/Blackwell GPUs).

Every tokamax implementation is a `custom_vjp`: reverse mode works, forward mode (jax.jvp)
does not. LSD and ESD therefore take their jvp targets through 'xla' (the student's trunk
built with `model.denoiser_parts(..., attention_impl='xla')`, objectives/distill/chunked.py)
while the student's differentiated forward uses the configured kernel.

tokamax's 'cudnn' implementation is not offered: it raises NotImplementedError for any
logits_soft_cap (tokamax 0.0.12, jax_nn.JaxNnDotProductAttention), and the softcap is the
model's (SPEC §3.4). Nor is tokamax's own 'xla' (its reference einsum): ours plays that part.

tokamax is imported here and nowhere else; without it only 'xla' is available and choosing
another implementation raises an ImportError naming `pip install fmlm-jax[kernels]`.
"""

from __future__ import annotations

import sys

import jax
from absl import flags as absl_flags

from fmlm_jax.config import ATTENTION_IMPLS

try:  # the optional extra: pip install fmlm-jax[kernels]
    import tokamax
except ImportError:  # pragma: no cover - exercised by monkeypatching `tokamax` to None
    tokamax = None

# The platforms (jax.default_backend()) each implementation runs on.
PLATFORMS = {
    "xla": ("cpu", "gpu", "tpu"),
    "xla_chunked": ("cpu", "gpu", "tpu"),
    "triton": ("gpu",),
    "mosaic": ("gpu", "tpu"),
}
assert set(PLATFORMS) == set(ATTENTION_IMPLS)


def available(platform: str | None = None) -> tuple[str, ...]:
    """The attention implementations that can run on `platform` (default: the default
    backend) with the packages installed here."""
    platform = platform or jax.default_backend()
    return tuple(impl for impl in ATTENTION_IMPLS
                 if platform in PLATFORMS[impl] and (impl == "xla" or tokamax is not None))


def check(impl: str, platform: str | None = None) -> None:
    """ValueError / ImportError naming the alternatives unless `impl` can run on `platform`."""
    platform = platform or jax.default_backend()
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "xla" and tokamax is None:
        raise ImportError(
            f"model.attention_impl={impl!r} needs the tokamax kernel library: pip install "
            f"fmlm-jax[kernels] (or pip install tokamax), or set model.attention_impl to one of "
            f"{available(platform)} (available here)")
    if platform not in PLATFORMS[impl]:
        raise ValueError(
            f"model.attention_impl={impl!r} runs on {PLATFORMS[impl]}, not on {platform!r}; "
            f"choose one of {available(platform)} (available on {platform})")


def softcap_attention(q: jax.Array, k: jax.Array, v: jax.Array, softcap: float, impl: str) -> jax.Array:
    """tokamax's `dot_product_attention` with the logit softcap, (B, L, H, hd) → (B, L, H, hd):
    softmax over keys of cap·tanh(q·kᵀ/√hd / cap), bidirectional, no mask (SPEC §3.4).
    `impl` is a tokamax implementation ('xla_chunked', 'triton', 'mosaic')."""
    check(impl)
    if not absl_flags.FLAGS.is_parsed():
        # tokamax reads its options from absl flags and would parse sys.argv whole on first use,
        # failing on any host program's own arguments (pytest's, argparse's): known ones only.
        absl_flags.FLAGS(sys.argv, known_only=True)
    try:
        return tokamax.dot_product_attention(q, k, v, logits_soft_cap=softcap, implementation=impl)
    except NotImplementedError as e:  # e.g. a GPU generation or head size the kernel lacks
        raise ValueError(
            f"model.attention_impl={impl!r} cannot run these inputs (q {q.shape} {q.dtype}) on "
            f"{jax.devices()[0].device_kind}: {e}; choose one of {available()}") from e
