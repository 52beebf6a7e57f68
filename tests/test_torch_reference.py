"""The independent PyTorch DiT (tests/torch_dit.py) reproduces the authors' reference outputs.

Fixtures: tests/fixtures/reference_{flm,fmlm,fmlm_llw}.ckpt and reference_outputs.npz,
produced by the authors' code on the CPU in float32 (see tests/fixtures/README.md).
"""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_dit import (  # noqa: E402
    TorchDiT,
    apply_ema,
    build_from_state_dict,
    load_reference_checkpoint,
)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OUTPUTS = os.path.join(FIXTURES, "reference_outputs.npz")
NAMES = ["flm", "fmlm", "fmlm_llw"]
TWO_TIME = {"flm": False, "fmlm": True, "fmlm_llw": True}
N_HEADS = 3
TOL = 1e-4


def _ckpt(name):
    return os.path.join(FIXTURES, f"reference_{name}.ckpt")


@pytest.fixture(scope="module")
def outputs():
    with np.load(OUTPUTS) as d:
        return {k: d[k] for k in d.files}


def _run(model, outputs, name):
    z = torch.from_numpy(outputs[f"{name}/z"]).float()
    tau_s = torch.from_numpy(outputs[f"{name}/tau_s"]).float()
    tau_t = torch.from_numpy(outputs[f"{name}/tau_t"]).float() if TWO_TIME[name] else None
    with torch.no_grad():
        out = model(z, tau_s, tau_t)
    assert out.dtype == torch.float32
    assert out.shape == z.shape
    return out.numpy()


@pytest.mark.parametrize("name", NAMES)
def test_config_inferred(name):
    sd, ema = load_reference_checkpoint(_ckpt(name))
    model = build_from_state_dict(sd, n_heads=N_HEADS)
    assert (model.vocab_size, model.hidden_size, model.cond_dim) == (61, 48, 24)
    assert len(model.blocks) == 2
    assert model.two_time == TWO_TIME[name]
    assert hasattr(model, "learnable_loss_weighting") == (name == "fmlm_llw")
    assert not any(k.startswith("teacher") or "inv_freq" in k for k in sd)
    assert ema is not None and len(ema) == len(sd)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_order_matches_checkpoint(name):
    ck = torch.load(_ckpt(name), map_location="cpu", weights_only=True)
    ck_keys = [k[len("backbone."):] for k in ck["state_dict"]]
    sd, _ = load_reference_checkpoint(_ckpt(name))
    model = build_from_state_dict(sd, n_heads=N_HEADS)
    names = [n for n, _ in model.named_parameters()]
    assert names == [k for k in ck_keys if k != "rotary_emb.inv_freq"]
    assert names == list(sd.keys())
    # With the (persistent) rotary buffer, the full state_dict order matches too.
    assert list(model.state_dict().keys()) == ck_keys
    # EMA list shapes line up with named_parameters() order.
    for (n, p), e in zip(model.named_parameters(), ck["ema"]["shadow_params"], strict=False):
        assert tuple(p.shape) == tuple(e.shape), n
    # Rotary buffer: inv_freq_j = 10000^(-2j/head_dim), equal to the reference's.
    ref_inv = ck["state_dict"]["backbone.rotary_emb.inv_freq"]
    assert torch.allclose(model.rotary_emb.inv_freq, ref_inv, rtol=1e-6, atol=0)
    assert "rotary_emb.inv_freq" not in names


@pytest.mark.parametrize("name", NAMES)
def test_logits_raw(name, outputs):
    sd, _ = load_reference_checkpoint(_ckpt(name))
    model = build_from_state_dict(sd, n_heads=N_HEADS)
    got = _run(model, outputs, name)
    diff = np.abs(got - outputs[f"{name}/logits_raw"]).max()
    assert diff <= TOL, f"{name} raw max abs diff {diff}"


@pytest.mark.parametrize("name", NAMES)
def test_logits_ema(name, outputs):
    sd, ema = load_reference_checkpoint(_ckpt(name))
    model = apply_ema(build_from_state_dict(sd, n_heads=N_HEADS), ema)
    got = _run(model, outputs, name)
    diff = np.abs(got - outputs[f"{name}/logits_ema"]).max()
    assert diff <= TOL, f"{name} EMA max abs diff {diff}"
    # EMA weights differ from raw (raw + 0.02), so the outputs must too.
    assert np.abs(got - outputs[f"{name}/logits_raw"]).max() > 1e-2


def test_loss_weight_ema(outputs):
    sd, ema = load_reference_checkpoint(_ckpt("fmlm_llw"))
    model = apply_ema(build_from_state_dict(sd, n_heads=N_HEADS), ema)
    tau_s = torch.from_numpy(outputs["fmlm_llw/tau_s"]).float()
    with torch.no_grad():
        w = model.loss_weight(tau_s).numpy()
    ref = outputs["fmlm_llw/loss_weight_ema"]
    assert w.shape == ref.shape == tau_s.shape
    diff = np.abs(w - ref).max()
    assert diff <= TOL, f"loss weight max abs diff {diff}"


def test_apply_ema_length_mismatch():
    sd, ema = load_reference_checkpoint(_ckpt("flm"))
    model = build_from_state_dict(sd, n_heads=N_HEADS)
    with pytest.raises(ValueError):
        apply_ema(model, ema[:-1])


def test_one_time_model_reuses_sigma_map_for_second_time(outputs):
    # No sigma_map_prime: a given tau_t goes through sigma_map as well (SPEC section 3 item 2).
    sd, _ = load_reference_checkpoint(_ckpt("flm"))
    model = build_from_state_dict(sd, n_heads=N_HEADS)
    z = torch.from_numpy(outputs["flm/z"]).float()
    tau_s = torch.from_numpy(outputs["flm/tau_s"]).float()
    tau_t = torch.from_numpy(outputs["flm/tau_t"]).float()
    with torch.no_grad():
        one = model(z, tau_s)
        two = model(z, tau_s, tau_t)
        c = torch.nn.functional.silu(model.sigma_map(tau_s) + model.sigma_map(tau_t))
        assert torch.allclose(model.conditioning(tau_s, tau_t), c)
    assert not torch.allclose(one, two)


@pytest.mark.parametrize(
    "two_time,llw,count", [(False, False, 130), (True, False, 134), (True, True, 142)]
)
def test_named_tensor_counts_12_blocks(two_time, llw, count):
    model = TorchDiT(11, 16, 8, 2, 12, two_time=two_time, learnable_loss_weighting=llw)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == count
    assert len(set(names)) == count
    assert names[0] == "vocab_embed.embedding"
    assert names[-1] == "output_layer.adaLN_modulation.bias"
    assert [n for n, _ in model.named_buffers()] == ["rotary_emb.inv_freq"]
    assert model.rotary_emb.inv_freq.shape == (4,)  # head_dim 8 -> 4 frequencies
