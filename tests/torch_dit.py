"""Independent PyTorch implementation of the SPEC section 3 DiT (test oracle).

Written from the SPEC text only. It reproduces the parameter names and the
``named_parameters()`` order of the reference checkpoints (SPEC section 7), so a
reference ``state_dict`` (with the ``backbone.`` prefix stripped) loads into it
directly and the ordered EMA list can be copied onto ``parameters()``.

Everything runs in float32, eval mode (no dropout), and ``forward`` returns the
raw logits (no output cap; the cap of SPEC section 3 item 6 is applied by the
callers).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

N_FREQ = 128  # time-embedding frequencies (256 features, cos first)


class TimestepEmbedder(nn.Module):
    """[cos(tau*f), sin(tau*f)] (f_i = exp(-ln(10000) i/128)) -> Linear -> SiLU -> Linear."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * N_FREQ, cond_dim, bias=True),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim, bias=True),
        )

    @staticmethod
    def features(tau: torch.Tensor) -> torch.Tensor:
        tau = tau.to(torch.float32).reshape(-1)
        i = torch.arange(N_FREQ, dtype=torch.float32, device=tau.device)
        freqs = torch.exp(-math.log(10000.0) * i / N_FREQ)
        args = tau[:, None] * freqs[None, :]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(tau))


class EmbeddingLayer(nn.Module):
    """h = z @ E for dense z (B, L, K); row lookup E[x] for integer tokens."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8):
            return self.embedding[z]
        return torch.matmul(z.to(torch.float32), self.embedding)


class LayerNormNoBias(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.to(torch.float32), (x.shape[-1],), self.weight, None, self.eps)


class Rotary(nn.Module):
    """Non-interleaved rotate-half rotary embedding; inv_freq_j = 10000^(-2j/head_dim)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq)

    def cos_sin(self, seq_len: int, device=None):
        pos = torch.arange(seq_len, dtype=torch.float32, device=device)
        theta = pos[:, None] * self.inv_freq[None, :]  # (L, hd/2)
        emb = torch.cat([theta, theta], dim=-1)  # (L, hd)
        return torch.cos(emb), torch.sin(emb)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, L, H, hd); cos/sin: (L, hd)
    return x * cos[None, :, None, :] + _rotate_half(x) * sin[None, :, None, :]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # shift/scale: (B, d), per sequence
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4,
                 softcap: float = 50.0):
        super().__init__()
        assert hidden_size % n_heads == 0
        self.n_heads = n_heads
        self.head_dim = hidden_size // n_heads
        self.softcap = softcap
        self.norm1 = LayerNormNoBias(hidden_size)
        self.attn_qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.attn_out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm2 = LayerNormNoBias(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_ratio * hidden_size, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * hidden_size, hidden_size, bias=True),
        )
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * hidden_size, bias=True)

    def forward(self, h, c, cos, sin):
        B, L, d = h.shape
        H, hd = self.n_heads, self.head_dim
        (shift1, scale1, gate1, shift2, scale2, gate2) = self.adaLN_modulation(c).chunk(6, dim=-1)

        a = _modulate(self.norm1(h), shift1, scale1)
        qkv = self.attn_qkv(a).view(B, L, 3, H, hd)  # f = which*d + head*hd + dim
        q, k, v = qkv.unbind(dim=2)  # each (B, L, H, hd)
        q = _apply_rotary(q, cos, sin)
        k = _apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
        if self.softcap is not None and self.softcap > 0:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        attn = torch.softmax(scores, dim=-1)
        o = torch.matmul(attn, v).transpose(1, 2).reshape(B, L, d)
        h = h + gate1[:, None, :] * self.attn_out(o)

        m = self.mlp(_modulate(self.norm2(h), shift2, scale2))
        h = h + gate2[:, None, :] * m
        return h


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNormNoBias(hidden_size)
        self.linear = nn.Linear(hidden_size, vocab_size, bias=True)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)

    def forward(self, h, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(h), shift, scale))


class LearnableLossWeighting(nn.Module):
    """w(tau_s) = Linear(128->1)(GELU_erf(Linear(cond->128)(TimestepEmbedder(tau_s))))."""

    def __init__(self, cond_dim: int, hidden: int = 128):
        super().__init__()
        self.s_embed = TimestepEmbedder(cond_dim)
        self.mlp = nn.Sequential(
            nn.Linear(cond_dim, hidden, bias=True),
            nn.GELU(),  # exact erf
            nn.Linear(hidden, 1, bias=True),
        )

    def forward(self, tau_s: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.s_embed(tau_s)).squeeze(-1)


class TorchDiT(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, cond_dim: int, n_heads: int,
                 n_blocks: int, two_time: bool = False, learnable_loss_weighting: bool = False,
                 softcap: float = 50.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.cond_dim = cond_dim
        self.n_heads = n_heads
        self.two_time = two_time
        # Registration order determines named_parameters() order (SPEC section 7).
        self.vocab_embed = EmbeddingLayer(vocab_size, hidden_size)
        self.sigma_map = TimestepEmbedder(cond_dim)
        if two_time:
            self.sigma_map_prime = TimestepEmbedder(cond_dim)
        self.rotary_emb = Rotary(hidden_size // n_heads)
        if learnable_loss_weighting:
            self.learnable_loss_weighting = LearnableLossWeighting(cond_dim)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, n_heads, cond_dim, softcap=softcap) for _ in range(n_blocks)]
        )
        self.output_layer = FinalLayer(hidden_size, vocab_size, cond_dim)
        self.eval()

    def conditioning(self, tau_s, tau_t=None):
        e = self.sigma_map(tau_s)
        if tau_t is not None:
            if self.two_time:
                e = e + self.sigma_map_prime(tau_t)
            else:
                e = e + self.sigma_map(tau_t)
        return F.silu(e)

    def forward(self, z, tau_s, tau_t=None):
        h = self.vocab_embed(z)
        c = self.conditioning(tau_s, tau_t)
        cos, sin = self.rotary_emb.cos_sin(h.shape[1], device=h.device)
        for blk in self.blocks:
            h = blk(h, c, cos, sin)
        return self.output_layer(h, c).to(torch.float32)

    def loss_weight(self, tau_s):
        if not hasattr(self, "learnable_loss_weighting"):
            raise AttributeError("model has no learnable_loss_weighting module")
        return self.learnable_loss_weighting(tau_s)


# ----------------------------------------------------------------------------- checkpoints

def _clean_key(k: str) -> str:
    """Strips torch.compile's `_orig_mod.` segments and the Lightning `backbone.` prefix."""
    k = k.replace("._orig_mod.", ".")
    if k.startswith("_orig_mod."):
        k = k[len("_orig_mod."):]
    if k.startswith("backbone."):
        k = k[len("backbone."):]
    return k


def load_reference_checkpoint(path):
    """Returns (state_dict without `backbone.`/teacher keys and the rotary buffer, EMA list).

    The EMA list is `ckpt["ema"]["shadow_params"]` (ordered like named_parameters()), or None.
    """
    ck = torch.load(path, map_location="cpu", weights_only=True)
    raw = ck["state_dict"] if "state_dict" in ck else ck
    sd = {}
    for k, v in raw.items():
        k = _clean_key(k)
        if k.startswith("teacher") or k.endswith("rotary_emb.inv_freq"):
            continue
        sd[k] = v.to(torch.float32)
    ema = None
    if isinstance(ck.get("ema"), dict) and "shadow_params" in ck["ema"]:
        ema = [t.to(torch.float32) for t in ck["ema"]["shadow_params"]]
    return sd, ema


def build_from_state_dict(sd, n_heads: int) -> TorchDiT:
    """Infers the config from tensor names/shapes, builds a TorchDiT and loads `sd`."""
    vocab_size, hidden_size = sd["vocab_embed.embedding"].shape
    cond_dim = sd["sigma_map.mlp.0.weight"].shape[0]
    block_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_blocks = max(block_ids) + 1 if block_ids else 0
    two_time = any(k.startswith("sigma_map_prime.") for k in sd)
    llw = any(k.startswith("learnable_loss_weighting.") for k in sd)
    model = TorchDiT(int(vocab_size), int(hidden_size), int(cond_dim), n_heads, n_blocks,
                     two_time=two_time, learnable_loss_weighting=llw)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise KeyError(f"state_dict mismatch: missing={missing} unexpected={unexpected}")
    return model.eval()


@torch.no_grad()
def apply_ema(model: nn.Module, ema_list) -> nn.Module:
    params = list(model.parameters())
    if len(params) != len(ema_list):
        raise ValueError(f"EMA list has {len(ema_list)} tensors, model has {len(params)} params")
    for p, e in zip(params, ema_list, strict=False):
        if tuple(p.shape) != tuple(e.shape):
            raise ValueError(f"EMA shape {tuple(e.shape)} != param shape {tuple(p.shape)}")
        p.copy_(e.to(p.dtype))
    return model


def random_model(vocab_size, hidden_size, cond_dim, n_heads, n_blocks, two_time=False,
                 learnable_loss_weighting=False, seed=0, std=0.2) -> TorchDiT:
    """A TorchDiT in eval mode whose every parameter (adaLN, output layer) is N(0, std²)."""
    torch.manual_seed(seed)
    model = TorchDiT(vocab_size, hidden_size, cond_dim, n_heads, n_blocks, two_time=two_time,
                     learnable_loss_weighting=learnable_loss_weighting)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()
