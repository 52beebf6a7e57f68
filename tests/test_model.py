"""The Flax DiT (fmlm_jax.model) and the reference name table (fmlm_jax.convert).

Oracles: the authors' outputs on the CPU (tests/fixtures, float32), the independent PyTorch
module tests/torch_dit.py (written from SPEC §3, itself checked against the authors'
outputs by tests/test_torch_reference.py), the SPEC's published parameter counts and hand
formulas. Every parity test uses fully random weights (adaLN and the output layer are
zero at init, which would hide almost every bug).
"""

import json
import math
import os
import re
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import skip_or_fail

from fmlm_jax import checkpoints, convert, kernels
from fmlm_jax.model import (
    DiT,
    attention_scores,
    count_params,
    init_params,
    log_probs,
    model_config,
    param_shapes,
    resolve_config,
    softcap_attention,
)

try:
    import torch
except ImportError:  # torch is a test extra; the pure-JAX tests still run without it
    torch = None

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
if torch is not None:
    from torch_dit import (  # noqa: E402
        TorchDiT,
        apply_ema,
        build_from_state_dict,
        load_reference_checkpoint,
        random_model,
    )

requires_torch = pytest.mark.skipif(torch is None, reason="needs torch (test extra)")

FIXTURES = os.path.join(TESTS, "fixtures")
REF_NAMES = ["flm", "fmlm", "fmlm_llw"]
REF_TWO_TIME = {"flm": False, "fmlm": True, "fmlm_llw": True}
TOL = 1e-4  # against the authors' outputs (EMA logits reach |30|)
# Against the PyTorch module on the same machine: measured ≤ 3e-6; tight enough to catch an
# erf-vs-tanh GELU swap in the blocks (1.3e-4 here).
TORCH_TOL = 2e-5

# A small, deliberately non-square model: K ≠ d ≠ cond, head_dim 8, L not a power of two.
VOCAB, HIDDEN, COND, HEADS, BLOCKS = 37, 32, 16, 4, 2
BATCH, LENGTH = 3, 9
COMBOS = [(False, False), (False, True), (True, False), (True, True)]


def small_config(two_time=False, llw=False, **overrides):
    kw = dict(hidden_size=HIDDEN, cond_dim=COND, n_heads=HEADS, n_blocks=BLOCKS, dropout=0.0)
    kw.update(overrides)
    return model_config("small", VOCAB, two_time=two_time, learnable_loss_weighting=llw, **kw)


def apply(cfg, params, z, tau_s, tau_t=None, **kw):
    """Eager DiT(cfg).apply (op by op; `test_jit_matches_eager` checks jit separately)."""
    tau_t = None if tau_t is None else jnp.asarray(tau_t)
    with jax.default_matmul_precision("float32"):
        out = DiT(cfg).apply({"params": params}, jnp.asarray(z), jnp.asarray(tau_s), tau_t, **kw)
    return np.asarray(out)


def loss_weight(cfg, params, tau_s):
    with jax.default_matmul_precision("float32"):
        w = DiT(cfg).apply({"params": params}, jnp.asarray(tau_s), method=DiT.loss_weight)
    return np.asarray(w)


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def inputs(seed=0, batch=BATCH, length=LENGTH, vocab=VOCAB):
    """x_t = (1−t)·ε + t·onehot(x) with per-sequence t, plus two network times."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(batch, length))
    t = rng.uniform(0.2, 0.9, size=(batch, 1, 1))
    z = (1 - t) * rng.standard_normal((batch, length, vocab)) + t * np.eye(vocab)[x]
    tau_s = rng.uniform(0.0, 1.0, size=batch)
    tau_t = rng.uniform(0.0, 1.0, size=batch)
    return z.astype(np.float32), tau_s.astype(np.float32), tau_t.astype(np.float32), x


def random_params(cfg, seed=0, std=0.2):
    """Every Flax parameter drawn N(0, std²) (adaLN and output layer included).

    Drawn with numpy on the shapes from `param_shapes`: no per-shape compilation.
    """
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32), param_shapes(cfg))


# ----------------------------------------------------------------------------- torch helpers


def torch_model(two_time, llw, seed=0, std=0.2):
    """A TorchDiT whose every parameter is redrawn from N(0, std²)."""
    return random_model(VOCAB, HIDDEN, COND, HEADS, BLOCKS, two_time, llw, seed, std)


def torch_state_dict(model):
    """named_parameters() as an ordered dict (the rotary buffer is not a parameter)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def torch_logits(model, z, tau_s, tau_t=None):
    as_t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))  # noqa: E731
    with torch.no_grad():
        return model(as_t(z), as_t(tau_s), as_t(tau_t)).numpy()


def reference_config(name):
    with open(os.path.join(FIXTURES, "reference_meta.json")) as f:
        m = json.load(f)["model"]
    return model_config(
        "small", m["vocab_size"], hidden_size=m["hidden_size"], cond_dim=m["cond_dim"],
        n_heads=m["n_heads"], n_blocks=m["n_blocks"], dropout=m["dropout"],
        two_time=REF_TWO_TIME[name], learnable_loss_weighting=name == "fmlm_llw",
    )


def reference_checkpoint(name):
    """(state dict without `backbone.` / rotary buffer, keys in checkpoint order; EMA list)."""
    ck = torch.load(os.path.join(FIXTURES, f"reference_{name}.ckpt"), map_location="cpu",
                    weights_only=True)
    sd = {}
    for key, value in ck["state_dict"].items():
        assert key.startswith("backbone."), key
        key = key[len("backbone."):]
        if key != "rotary_emb.inv_freq":
            sd[key] = value
    return sd, list(ck["ema"]["shadow_params"])


@pytest.fixture(scope="module")
def ref_outputs():
    with np.load(os.path.join(FIXTURES, "reference_outputs.npz")) as d:
        return {k: d[k] for k in d.files}


# ----------------------------------------------------------------------------- 1. authors' outputs


def _ref_apply(name, params, out):
    z, tau_s = out[f"{name}/z"], out[f"{name}/tau_s"]
    tau_t = out[f"{name}/tau_t"] if REF_TWO_TIME[name] else None
    got = apply(reference_config(name), params, z, tau_s, tau_t)
    assert got.dtype == np.float32 and got.shape == z.shape
    return got


@requires_torch
@pytest.mark.parametrize("name", REF_NAMES)
def test_reference_logits_raw(name, ref_outputs):
    sd, _ = reference_checkpoint(name)
    params = convert.params_from_state_dict(sd, reference_config(name))
    got = _ref_apply(name, params, ref_outputs)
    diff = max_diff(got, ref_outputs[f"{name}/logits_raw"])
    assert diff <= TOL, f"{name} raw logits max abs diff {diff}"


@requires_torch
@pytest.mark.parametrize("name", REF_NAMES)
def test_reference_logits_ema(name, ref_outputs):
    cfg = reference_config(name)
    sd, ema = reference_checkpoint(name)
    table = convert.reference_names(cfg)
    assert len(ema) == len(table) == len(sd)
    ema_sd = {tname: tensor for (tname, _, _), tensor in zip(table, ema, strict=False)}
    params = convert.params_from_state_dict(ema_sd, cfg)
    got = _ref_apply(name, params, ref_outputs)
    diff = max_diff(got, ref_outputs[f"{name}/logits_ema"])
    assert diff <= TOL, f"{name} EMA logits max abs diff {diff}"
    # The EMA weights (raw + 0.02) really were used.
    assert max_diff(got, ref_outputs[f"{name}/logits_raw"]) > 1e-2


@requires_torch
def test_reference_loss_weight_ema(ref_outputs):
    cfg = reference_config("fmlm_llw")
    _, ema = reference_checkpoint("fmlm_llw")
    ema_sd = {n: t for (n, _, _), t in zip(convert.reference_names(cfg), ema, strict=False)}
    params = convert.params_from_state_dict(ema_sd, cfg)
    tau_s = ref_outputs["fmlm_llw/tau_s"]
    w = loss_weight(cfg, params, tau_s)
    ref = ref_outputs["fmlm_llw/loss_weight_ema"]
    assert w.shape == ref.shape == tau_s.shape
    diff = max_diff(w, ref)
    assert diff <= TOL, f"loss weight max abs diff {diff}"
    assert np.abs(ref).max() > 0.1  # a non-trivial value, not the zero-init output


# ----------------------------------------------------------------------------- 2. PyTorch module


@requires_torch
@pytest.mark.parametrize("two_time,llw", COMBOS)
def test_torch_parity_random_weights(two_time, llw):
    model = torch_model(two_time, llw, seed=int(two_time) * 2 + int(llw))
    sd = torch_state_dict(model)
    for name, tensor in sd.items():  # nothing left at its (zero / one) init
        assert bool((tensor != 0).all()) and float((tensor - 1).abs().min()) > 0, name
        assert float(tensor.abs().mean()) > 0.05, name
    cfg = small_config(two_time, llw)
    params = convert.params_from_state_dict(sd, cfg)
    z, tau_s, tau_t, _ = inputs(seed=1)
    tt = tau_t if two_time else None
    got = apply(cfg, params, z, tau_s, tt)
    want = torch_logits(model, z, tau_s, tt)
    assert got.shape == want.shape == (BATCH, LENGTH, VOCAB) and got.dtype == np.float32
    assert np.abs(want).max() > 1.0  # a non-degenerate output
    diff = max_diff(got, want)
    assert diff <= TORCH_TOL, f"two_time={two_time} llw={llw}: max abs diff {diff}"
    # Capped log-probabilities agree as well.
    want_lp = torch.log_softmax(30 * torch.tanh(torch.from_numpy(want) / 30), -1).numpy()
    assert max_diff(log_probs(jnp.asarray(got)), want_lp) <= TORCH_TOL
    if llw:
        w = loss_weight(cfg, params, tau_s)
        with torch.no_grad():
            w_ref = model.loss_weight(torch.from_numpy(tau_s)).numpy()
        assert w.shape == (BATCH,)
        assert max_diff(w, w_ref) <= TORCH_TOL
        assert np.abs(w_ref).max() > 1e-2
    if two_time:
        # The second time really enters: a different tau_t changes the output.
        other = apply(cfg, params, z, tau_s, tau_s)
        assert max_diff(other, got) > 1e-2
        assert max_diff(other, torch_logits(model, z, tau_s, tau_s)) <= TORCH_TOL


@requires_torch
@pytest.mark.parametrize("two_time", [False, True])
def test_torch_parity_integer_tokens(two_time):
    model = torch_model(two_time, False, seed=7)
    cfg = small_config(two_time)
    params = convert.params_from_state_dict(torch_state_dict(model), cfg)
    _, tau_s, tau_t, x = inputs(seed=2)
    tt = tau_t if two_time else None
    got = apply(cfg, params, x.astype(np.int32), tau_s, tt)
    want = torch_logits(model, x.astype(np.int64), tau_s, tt)
    assert got.shape == (BATCH, LENGTH, VOCAB)
    assert max_diff(got, want) <= TORCH_TOL
    # A token id is its one-hot vector: z·E = E[x].
    onehot = np.eye(VOCAB, dtype=np.float32)[x]
    assert max_diff(apply(cfg, params, onehot, tau_s, tt), got) <= 1e-5


@requires_torch
def test_torch_parity_one_time_model_given_tau_t():
    # No sigma_map_prime: the reference embeds tau_t with sigma_map too (SPEC §3.2).
    model = torch_model(False, False, seed=3)
    cfg = small_config(False)
    params = convert.params_from_state_dict(torch_state_dict(model), cfg)
    z, tau_s, tau_t, _ = inputs(seed=3)
    got = apply(cfg, params, z, tau_s, tau_t)
    assert max_diff(got, torch_logits(model, z, tau_s, tau_t)) <= TORCH_TOL
    assert max_diff(got, apply(cfg, params, z, tau_s)) > 1e-2


@requires_torch
def test_torch_parity_bigger_batch_and_length():
    # Rotary positions and the bidirectional attention over a longer sequence.
    model = torch_model(True, False, seed=11)
    cfg = small_config(True)
    params = convert.params_from_state_dict(torch_state_dict(model), cfg)
    z, tau_s, tau_t, _ = inputs(seed=4, batch=2, length=33)
    got = apply(cfg, params, z, tau_s, tau_t)
    assert max_diff(got, torch_logits(model, z, tau_s, tau_t)) <= TORCH_TOL


def test_scalar_times_broadcast():
    cfg = small_config(True)
    params = random_params(cfg, seed=5)
    z, _, _, _ = inputs(seed=5)
    a = apply(cfg, params, z, 0.3, 0.7)
    b = apply(cfg, params, z, np.full(BATCH, 0.3, np.float32), np.full(BATCH, 0.7, np.float32))
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- 3. name table


@requires_torch
@pytest.mark.parametrize("two_time,llw", COMBOS)
def test_table_order_is_torch_named_parameters(two_time, llw):
    with torch.device("meta"):
        model = TorchDiT(VOCAB, HIDDEN, COND, HEADS, BLOCKS, two_time=two_time,
                         learnable_loss_weighting=llw)
    torch_names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    table = convert.reference_names(small_config(two_time, llw))
    assert [n for n, _, _ in table] == [n for n, _ in torch_names]
    # Shapes line up through the transpose flag with the Flax parameter shapes.
    shapes = param_shapes(small_config(two_time, llw))
    for (name, path, transpose), (_, torch_shape) in zip(table, torch_names, strict=False):
        leaf = shapes
        for key in path:
            leaf = leaf[key]
        assert (leaf.shape[::-1] if transpose else leaf.shape) == torch_shape, name
        assert transpose == (name.endswith(".weight") and len(torch_shape) == 2), name


@pytest.mark.parametrize("two_time,llw", COMBOS)
def test_table_covers_exactly_the_flax_parameters(two_time, llw):
    cfg = small_config(two_time, llw)
    table_paths = sorted(path for _, path, _ in convert.reference_names(cfg))
    flax_paths = sorted(
        tuple(k.key for k in kp)
        for kp, _ in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    )
    assert table_paths == flax_paths
    assert len(set(table_paths)) == len(table_paths)


@requires_torch
@pytest.mark.parametrize("two_time,llw,count", [
    (False, False, 130), (True, False, 134), (False, True, 138), (True, True, 142),
])
def test_table_counts_12_blocks(two_time, llw, count):
    cfg = model_config("small", 61, two_time=two_time, learnable_loss_weighting=llw)
    table = convert.reference_names(cfg)
    assert len(table) == count
    with torch.device("meta"):
        model = TorchDiT(61, 768, 128, 12, 12, two_time=two_time, learnable_loss_weighting=llw)
    assert [n for n, _, _ in table] == [n for n, _ in model.named_parameters()]
    assert table[0][0] == "vocab_embed.embedding"
    assert table[-1][0] == "output_layer.adaLN_modulation.bias"


@requires_torch
@pytest.mark.parametrize("name", REF_NAMES)
def test_round_trip_reference_checkpoint_bit_exact(name):
    cfg = reference_config(name)
    sd, _ = reference_checkpoint(name)
    back = convert.state_dict_from_params(convert.params_from_state_dict(sd, cfg), cfg)
    assert list(back) == list(sd)  # the checkpoint's order
    assert list(back) == [n for n, _, _ in convert.reference_names(cfg)]
    for key, tensor in sd.items():
        ref = tensor.numpy()
        assert back[key].dtype == np.float32 and back[key].shape == ref.shape, key
        np.testing.assert_array_equal(back[key], ref, err_msg=key)


@pytest.mark.parametrize("two_time,llw", COMBOS)
def test_round_trip_flax_params_bit_exact(two_time, llw):
    cfg = small_config(two_time, llw)
    params = random_params(cfg, seed=9)
    sd = convert.state_dict_from_params(params, cfg)
    # Linear kernels come back as torch (out, in) weights.
    np.testing.assert_array_equal(
        sd["blocks.0.attn_qkv.weight"], np.asarray(params["blocks_0"]["attn_qkv"]["kernel"]).T)
    assert sd["blocks.0.attn_qkv.weight"].shape == (3 * HIDDEN, HIDDEN)
    assert sd["output_layer.linear.weight"].shape == (VOCAB, HIDDEN)
    back = convert.params_from_state_dict(sd, cfg)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params), strict=False):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- 4. parameter counts


def hand_count(K, d, cond, blocks, two_time=False, llw=False, mlp_ratio=4):
    """SPEC §3 parameter count by hand."""
    time_embed = 256 * cond + cond + cond * cond + cond
    block = 2 * d + 3 * d * d + d * d + (d * mlp_ratio * d + mlp_ratio * d) + (
        mlp_ratio * d * d + d) + (cond * 6 * d + 6 * d)
    final = d + d * K + K + cond * 2 * d + 2 * d
    n = K * d + time_embed + blocks * block + final
    if two_time:
        n += time_embed
    if llw:
        n += time_embed + cond * 128 + 128 + 128 + 1
    return n


@pytest.mark.parametrize("K,count", [(30522, 139_292_986), (50258, 169_627_218)])
def test_published_parameter_counts(K, count):
    base = count_params(param_shapes(model_config("small", K)))
    assert base == count == hand_count(K, 768, 128, 12)
    two = count_params(param_shapes(model_config("small", K, two_time=True)))
    assert two - base == 49_408
    both = count_params(param_shapes(
        model_config("small", K, two_time=True, learnable_loss_weighting=True)))
    assert both - two == 66_049


@pytest.mark.parametrize("two_time,llw", COMBOS)
def test_parameter_count_hand_formula_and_torch(two_time, llw):
    cfg = small_config(two_time, llw)
    n = count_params(param_shapes(cfg))
    assert n == hand_count(VOCAB, HIDDEN, COND, BLOCKS, two_time, llw)
    if torch is not None:
        with torch.device("meta"):
            model = TorchDiT(VOCAB, HIDDEN, COND, HEADS, BLOCKS, two_time=two_time,
                             learnable_loss_weighting=llw)
        assert n == sum(p.numel() for p in model.parameters())


def test_param_shapes_does_not_allocate():
    shapes = param_shapes(model_config("small", 50258))
    leaves = jax.tree_util.tree_leaves(shapes)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert shapes["vocab_embed"]["embedding"].shape == (50258, 768)
    assert shapes["output_layer"]["linear"]["kernel"].shape == (768, 50258)
    assert shapes["blocks_11"]["attn_qkv"]["kernel"].shape == (768, 3 * 768)
    assert "blocks_12" not in shapes


# ------------------------------------------------------------------------ 5. invariants, policy


@pytest.mark.parametrize("two_time,llw", COMBOS)
def test_zero_init_gives_uniform_distribution(two_time, llw):
    cfg = small_config(two_time, llw)
    params = init_params(cfg, jax.random.key(0))
    z, tau_s, tau_t, _ = inputs(seed=6)
    logits = apply(cfg, params, z, tau_s, tau_t if two_time else None)
    np.testing.assert_array_equal(logits, np.zeros_like(logits))
    lp = np.asarray(log_probs(jnp.asarray(logits)))
    np.testing.assert_allclose(lp, -math.log(VOCAB), rtol=0, atol=1e-6)
    if llw:
        np.testing.assert_array_equal(loss_weight(cfg, params, tau_s), np.zeros(BATCH))
    # Zero-init: adaLN (weights, biases) and the output Linear; the rest is not zero.
    for i in range(BLOCKS):
        for leaf in params[f"blocks_{i}"]["adaLN_modulation"].values():
            assert not np.any(np.asarray(leaf))
        assert np.asarray(params[f"blocks_{i}"]["attn_qkv"]["kernel"]).std() > 0
    for leaf in list(params["output_layer"]["adaLN_modulation"].values()) + list(
            params["output_layer"]["linear"].values()):
        assert not np.any(np.asarray(leaf))


def test_init_distributions_follow_torch_defaults():
    cfg = small_config(False, True)
    p = init_params(cfg, jax.random.key(3))
    # U(±1/√fan_in): kaiming-uniform(a=√5) for E (fan_in = d) and torch Linear defaults.
    for arr, fan_in in [
        (p["vocab_embed"]["embedding"], HIDDEN),
        (p["blocks_0"]["attn_qkv"]["kernel"], HIDDEN),
        (p["blocks_0"]["mlp_2"]["kernel"], 4 * HIDDEN),
        (p["blocks_0"]["mlp_0"]["bias"], HIDDEN),
        (p["sigma_map"]["mlp_0"]["kernel"], 256),
    ]:
        arr = np.asarray(arr)
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(arr).max() <= bound
        assert np.abs(arr).max() > 0.9 * bound  # uses the range, not a narrower one
    np.testing.assert_array_equal(np.asarray(p["blocks_0"]["norm1"]["scale"]), np.ones(HIDDEN))
    assert not np.any(np.asarray(p["learnable_loss_weighting"]["mlp_2"]["kernel"]))


def test_log_probs_normalised_and_capped():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, VOCAB)) * np.array([1.0, 1e4])[:, None, None]
    logits[1, 0, 0] = 1e30  # huge, finite
    logits[1, 1, :] = -1e30
    lp = np.asarray(log_probs(jnp.asarray(logits, jnp.float32)), np.float64)
    assert np.all(np.isfinite(lp))
    np.testing.assert_allclose(np.log(np.exp(lp).sum(-1)), 0.0, atol=1e-5)
    # Independent formula: log_softmax of 30·tanh(logits/30).
    capped = 30 * np.tanh(logits / 30)
    want = capped - np.log(np.exp(capped - capped.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - capped.max(-1, keepdims=True)
    np.testing.assert_allclose(lp, want, atol=1e-4)
    # Capped logits lie in [−30, 30], so no log-probability is below −60 − log K.
    assert lp.min() >= -60 - math.log(VOCAB) - 1e-4
    assert lp.max() <= 0.0
    # A row of all −1e30 is uniform after the cap.
    np.testing.assert_allclose(lp[1, 1], -math.log(VOCAB), atol=1e-5)
    # log_probs of logits in bf16 come out float32.
    assert log_probs(jnp.zeros((1, 3), jnp.bfloat16)).dtype == jnp.float32


def test_dropout_train_vs_eval():
    cfg = small_config(True, dropout=0.5)
    params = random_params(cfg, seed=4)
    z, tau_s, tau_t, _ = inputs(seed=8)
    ev1 = apply(cfg, params, z, tau_s, tau_t)
    ev2 = apply(cfg, params, z, tau_s, tau_t, train=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(ev1, ev2)
    tr1 = apply(cfg, params, z, tau_s, tau_t, train=True, rngs={"dropout": jax.random.key(1)})
    tr1b = apply(cfg, params, z, tau_s, tau_t, train=True, rngs={"dropout": jax.random.key(1)})
    tr2 = apply(cfg, params, z, tau_s, tau_t, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(tr1, tr1b)
    assert max_diff(tr1, ev1) > 1e-2
    assert max_diff(tr1, tr2) > 1e-2
    # With dropout 0, train mode is the eval computation.
    cfg0 = small_config(True, dropout=0.0)
    tr0 = apply(cfg0, params, z, tau_s, tau_t, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(tr0, ev1)


@pytest.mark.parametrize("two_time", [False, True])
def test_bf16_compute_close_to_float32(two_time):
    cfg32 = small_config(two_time)
    cfg16 = small_config(two_time, dtype="bfloat16")
    params = random_params(cfg32, seed=12)
    z, tau_s, tau_t, _ = inputs(seed=9)
    tt = tau_t if two_time else None
    a = apply(cfg32, params, z, tau_s, tt)
    b = apply(cfg16, params, z, tau_s, tt)
    assert b.dtype == np.float32 and b.shape == a.shape
    rel = max_diff(a, b) / np.abs(a).max()
    assert rel <= 5e-2, f"bf16 relative max diff {rel}"
    assert max_diff(a, b) > 0  # the policy actually changed the compute dtype
    # Parameters stay float32 under a bf16 compute policy.
    p16 = init_params(cfg16, jax.random.key(0))
    assert {x.dtype for x in jax.tree_util.tree_leaves(p16)} == {jnp.dtype(jnp.float32)}


def test_bf16_policy_keeps_the_residual_stream_layernorms_and_outputs_float32():
    # SPEC §3.8: under a bf16 compute policy the matmuls run in bf16, but the residual stream,
    # the LayerNorms, the time embedding and the logits stay float32. The residual stream is
    # what every LayerNorm reads (norm1 before attention, norm2 between attention and MLP,
    # the final norm): their inputs are recorded as the model runs.
    cfg = small_config(True, dtype="bfloat16")
    params = random_params(cfg, seed=3)
    z, tau_s, tau_t, _ = inputs(seed=4)
    ln_inputs = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, flax.linen.LayerNorm) and context.method_name == "__call__":
            ln_inputs["/".join(context.module.path)] = args[0].dtype
        return next_fun(*args, **kwargs)

    args = (jnp.asarray(z), jnp.asarray(tau_s), jnp.asarray(tau_t))
    with flax.linen.intercept_methods(record):
        logits, state = DiT(cfg).apply({"params": params}, *args, capture_intermediates=True,
                                       mutable=["intermediates"])
    assert len(ln_inputs) == 2 * BLOCKS + 1 and set(ln_inputs.values()) == {jnp.dtype(jnp.float32)}, ln_inputs
    found = {"/".join(path): leaf[0].dtype  # each captured module output (a 1-tuple)
             for path, leaf in flax.traverse_util.flatten_dict(state["intermediates"]).items()}
    block_outputs = {k: v for k, v in found.items() if re.fullmatch(r"blocks_\d+/__call__", k)}
    norms = {k: v for k, v in found.items() if re.search(r"norm\w*/__call__", k)}
    linears = {k: v for k, v in found.items()
               if re.fullmatch(r"blocks_\d+/(attn_qkv|mlp_0|mlp_2|attn_out)/__call__", k)}
    assert len(block_outputs) == BLOCKS and set(block_outputs.values()) == {jnp.dtype(jnp.float32)}
    assert norms and set(norms.values()) == {jnp.dtype(jnp.float32)}, norms
    assert linears and set(linears.values()) == {jnp.dtype(jnp.bfloat16)}, linears  # the policy is on
    assert found["sigma_map/__call__"] == jnp.float32 and logits.dtype == jnp.float32


def test_bf16_attention_scores_are_accumulated_in_float32():
    # SPEC §4: QKᵀ in float32 before the softcap and softmax, even with bf16 q and k.
    keys = jax.random.split(jax.random.key(0), 2)
    q, k = ((3.0 * jax.random.normal(key, (2, 16, 4, 64))).astype(jnp.bfloat16) for key in keys)
    scores = attention_scores(q, k, 50.0)
    assert scores.dtype == jnp.float32
    got = np.asarray(scores, np.float64)
    exact = np.einsum("blhd,bmhd->bhlm", np.asarray(q, np.float64), np.asarray(k, np.float64)) / 8.0
    exact = 50.0 * np.tanh(exact / 50.0)
    assert np.abs(exact).max() > 10.0
    assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()  # float32 level
    bf16 = np.asarray(jnp.einsum("blhd,bmhd->bhlm", q, k).astype(jnp.float32), np.float64) / 8.0
    assert np.abs(50.0 * np.tanh(bf16 / 50.0) - exact).max() > 1e-3 * np.abs(exact).max()  # what it avoids


# ----------------------------------------------------------------------------- fused attention (issue #16)
# The tokamax implementations that run on CPU must be our float32 einsum, forward and
# gradient (measured: ≤ 8.2e-6 forward and gradient with scores up to ~|40|, ≤ 6.6e-7 with
# unit-variance q, k; B 2, L 128/1024); the GPU/TPU kernels are selected the same way and run
# by benchmarks/device.py.
# tokamax is in the test extra: CI (FMLM_JAX_REQUIRE_ASSETS=1) fails rather than skips
# without it. tokamax's Pallas kernels have no CPU interpret mode behind its public API.
CPU_KERNELS = ("xla_chunked",)


def require_tokamax():
    if kernels.tokamax is None:
        skip_or_fail("needs tokamax (pip install fmlm-jax[kernels])")


def _attention_inputs(length=40, heads=3, head_dim=16):
    keys = jax.random.split(jax.random.key(0), 4)
    # scores up to ~|40|: the softcap 50·tanh(·/50) bends them visibly
    q, k = (3.0 * jax.random.normal(key, (2, length, heads, head_dim)) for key in keys[:2])
    v, g = (jax.random.normal(key, (2, length, heads, head_dim)) for key in keys[2:])
    return q, k, v, g


@pytest.mark.parametrize("impl", CPU_KERNELS)
def test_kernel_attention_equals_ours_forward_and_gradient(impl):
    require_tokamax()
    q, k, v, g = _attention_inputs()
    assert float(jnp.abs(attention_scores(q, k, 1e9)).max()) > 30.0  # the cap matters here

    def loss(impl, softcap=50.0):
        return lambda q, k, v: jnp.sum(softcap_attention(q, k, v, softcap, impl) * g)

    ours, kernel = (jax.jit(jax.value_and_grad(loss(i), argnums=(0, 1, 2))) for i in ("xla", impl))
    (_, grads), (_, grads_k) = ours(q, k, v), kernel(q, k, v)
    out = softcap_attention(q, k, v, 50.0)
    out_k = jax.jit(lambda *a: softcap_attention(*a, 50.0, impl))(q, k, v)
    assert max_diff(out, out_k) <= 1e-5
    assert max(max_diff(a, b) for a, b in zip(grads, grads_k, strict=True)) <= 1e-5
    uncapped = softcap_attention(q, k, v, 1e9)
    assert max_diff(out_k, uncapped) > 1e-2  # the kernel applied the softcap


def test_dit_with_a_kernel_equals_the_xla_dit_and_refuses_jvp():
    require_tokamax()
    cfg, cfg_k = small_config(True), small_config(True, attention_impl=CPU_KERNELS[0])
    params = random_params(cfg, seed=3)
    z, tau_s, tau_t, _ = inputs(seed=4)
    fns = [jax.jit(jax.value_and_grad(lambda p, c=c: jnp.sum(jnp.sin(DiT(c).apply({"params": p}, z, tau_s,
                                                                                   tau_t)))))
           for c in (cfg, cfg_k)]
    (value, grads), (value_k, grads_k) = (fn(params) for fn in fns)
    assert abs(float(value) - float(value_k)) <= 1e-5 * max(1.0, abs(float(value)))
    leaves, leaves_k = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_k)
    scale = max(float(np.abs(a).max()) for a in leaves)  # gradients reach ~10 here
    assert max(max_diff(a, b) for a, b in zip(leaves, leaves_k, strict=True)) <= 1e-5 * scale
    # A custom-VJP kernel has no forward-mode derivative: why LSD/ESD take their jvp via 'xla'.
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda t: DiT(cfg_k).apply({"params": params}, z, tau_s, t), (tau_t,), (tau_t,))


def test_attention_impl_errors_name_the_alternatives(monkeypatch):
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        resolve_config(small_config(attention_impl="flash"))
    q, k, v, _ = _attention_inputs(length=8)
    if kernels.tokamax is not None:  # a GPU kernel on this CPU
        with pytest.raises(ValueError, match=re.escape("choose one of ('xla', 'xla_chunked')")):
            softcap_attention(q, k, v, 50.0, "triton")
        with pytest.raises(ValueError, match="not on 'tpu'"):
            kernels.check("triton", "tpu")
    monkeypatch.setattr(kernels, "tokamax", None)  # the optional extra not installed
    with pytest.raises(ImportError, match=re.escape("pip install fmlm-jax[kernels]")) as error:
        softcap_attention(q, k, v, 50.0, "xla_chunked")
    assert "('xla',)" in str(error.value) and kernels.available("gpu") == ("xla",)


def test_attention_impl_is_no_part_of_a_checkpoints_architecture(tmp_path):
    # A run trained with a GPU kernel loads on CPU: load resets attention_impl to 'xla' unless
    # asked, and the fingerprint ignores it (a run resumed with another kernel is the same model).
    gpu, cpu = small_config(True, attention_impl="triton"), small_config(True)
    assert checkpoints.model_fingerprint(gpu) == checkpoints.model_fingerprint(cpu)
    assert "attention_impl" not in checkpoints.architecture(gpu)
    meta = checkpoints.run_metadata(ml_collections.ConfigDict(dict(model=gpu)))
    assert meta["model_config"]["attention_impl"] == "triton"
    checkpoints.check_compatible(meta, cpu)  # resuming with 'xla': not "another model"
    params = random_params(cpu, seed=5)  # the same shapes (init would run the GPU kernel)
    checkpoints.export_params(tmp_path / "export", params, params, gpu, step=3)
    meta = checkpoints.load_checkpoint(tmp_path / "export").meta
    assert meta["model_config"]["attention_impl"] == "triton"  # as trained
    loaded, cfg, _ = checkpoints.load(tmp_path / "export")
    assert cfg.attention_impl == "xla" and cfg.hidden_size == HIDDEN
    z, tau_s, tau_t, _ = inputs(seed=6)
    out = jax.jit(lambda p: DiT(cfg).apply({"params": p}, z, tau_s, tau_t))(loaded)  # runs here
    assert bool(jnp.all(jnp.isfinite(out)))
    _, asked, _ = checkpoints.load(tmp_path / "export", attention_impl="xla_chunked")
    assert asked.attention_impl == "xla_chunked"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        checkpoints.load(tmp_path / "export", attention_impl="flash")


def test_jit_matches_eager():
    cfg = small_config(True, True)
    params = random_params(cfg, seed=13)
    z, tau_s, tau_t, _ = inputs(seed=10)
    model = DiT(cfg)
    fn = jax.jit(lambda p, z, s, t: log_probs(model.apply({"params": p}, z, s, t)))
    with jax.default_matmul_precision("float32"):
        got = np.asarray(fn(params, z, tau_s, tau_t))
    want = np.asarray(log_probs(jnp.asarray(apply(cfg, params, z, tau_s, tau_t))))
    assert max_diff(got, want) <= 1e-5
    w = jax.jit(lambda p, s: model.apply({"params": p}, s, method=DiT.loss_weight))(params, tau_s)
    assert max_diff(w, loss_weight(cfg, params, tau_s)) <= 1e-5


# ----------------------------------------------------------------------------- 6. errors


def test_input_errors():
    cfg = small_config(False)
    params = random_params(cfg)
    z, tau_s, tau_t, x = inputs(seed=0)
    with pytest.raises(ValueError, match=re.escape(f"z must be (B, L, {VOCAB})")):
        apply(cfg, params, z[..., :-1], tau_s)  # wrong last dim
    with pytest.raises(ValueError, match="z must be"):
        apply(cfg, params, z[0], tau_s)  # float (L, K): wrong rank
    with pytest.raises(ValueError, match="z must be"):
        apply(cfg, params, x[0].astype(np.int32), tau_s)  # ids (L,): wrong rank
    with pytest.raises(ValueError, match=re.escape(f"tau_s must have shape ({BATCH},)")):
        apply(cfg, params, z, tau_s[:2])
    with pytest.raises(ValueError, match=re.escape("tau_t must have shape")):
        apply(cfg, params, z, tau_s, tau_t[:, None])
    with pytest.raises(ValueError, match="no learnable loss weighting"):
        loss_weight(cfg, params, tau_s)


def test_two_time_model_requires_tau_t():
    cfg = small_config(True)
    params = random_params(cfg)
    z, tau_s, _, _ = inputs(seed=0)
    with pytest.raises(ValueError, match="needs tau_t"):
        apply(cfg, params, z, tau_s)


def test_config_errors():
    with pytest.raises(KeyError, match="hidden_sise"):
        model_config("small", 61, hidden_sise=32)
    with pytest.raises(ValueError, match="unknown model size"):
        model_config("huge", 61)
    cfg = small_config()
    missing = cfg.copy_and_resolve_references()
    del missing["cond_dim"]
    with pytest.raises(ValueError, match=re.escape("lacks ['cond_dim']")):
        resolve_config(missing)
    extra = cfg.copy_and_resolve_references()
    extra.n_layers = 3
    with pytest.raises(ValueError, match=re.escape("unknown fields ['n_layers']")):
        resolve_config(extra)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        resolve_config(small_config(hidden_size=30))
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        init_params(small_config(n_heads=5), jax.random.key(0))
    with pytest.raises(ValueError, match="even head dimension"):
        resolve_config(small_config(hidden_size=36, n_heads=4))
    # The optional fields are filled in; the required ones pass through.
    bare = small_config()
    del bare["attn_softcap"]
    resolved = resolve_config(bare)
    assert resolved.attn_softcap == 50.0 and resolved.vocab_size == VOCAB


def test_state_dict_errors():
    cfg1, cfg2 = small_config(False), small_config(True)
    sd1 = convert.state_dict_from_params(random_params(cfg1), cfg1)
    sd2 = convert.state_dict_from_params(random_params(cfg2), cfg2)
    # Missing tensor.
    partial = dict(sd1)
    del partial["blocks.1.mlp.0.bias"]
    with pytest.raises(ValueError, match=re.escape("missing ['blocks.1.mlp.0.bias']")):
        convert.params_from_state_dict(partial, cfg1)
    # Unexpected tensor: the rotary buffer must be dropped, a two-time checkpoint needs a
    # two-time config.
    with pytest.raises(ValueError, match=re.escape("unexpected ['rotary_emb.inv_freq']")):
        convert.params_from_state_dict({**sd1, "rotary_emb.inv_freq": np.ones(4)}, cfg1)
    with pytest.raises(ValueError, match=r"unexpected \['sigma_map_prime\.mlp\.0\.bias'"):
        convert.params_from_state_dict(sd2, cfg1)
    with pytest.raises(ValueError, match=r"missing \['sigma_map_prime\.mlp\.0\.weight'"):
        convert.params_from_state_dict(sd1, cfg2)
    # Wrong shape: names in the message, shapes in torch layout.
    bad = dict(sd1)
    bad["blocks.0.attn_out.weight"] = np.zeros((HIDDEN, HIDDEN + 1), np.float32)
    with pytest.raises(ValueError, match=re.escape(
            f"blocks.0.attn_out.weight: shape ({HIDDEN}, {HIDDEN + 1}) does not match the model "
            f"config (expects ({HIDDEN}, {HIDDEN}))")):
        convert.params_from_state_dict(bad, cfg1)
    with pytest.raises(ValueError, match=re.escape(
            f"vocab_embed.embedding: shape ({VOCAB}, {HIDDEN}) does not match the model config "
            f"(expects ({VOCAB + 1}, {HIDDEN}))")):
        convert.params_from_state_dict(sd1, model_config(
            "small", VOCAB + 1, hidden_size=HIDDEN, cond_dim=COND, n_heads=HEADS,
            n_blocks=BLOCKS, dropout=0.0))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_times_outside_unit_interval_are_rejected(bad):
    cfg = model_config("tiny", 11, hidden_size=16, cond_dim=8, n_blocks=1, n_heads=2)
    params = init_params(cfg, jax.random.key(0))
    z = jnp.zeros((2, 3, 11))
    with pytest.raises(ValueError, match=r"tau_s must lie in \[0, 1\]"):
        DiT(cfg).apply({"params": params}, z, jnp.array([0.5, bad]))
    with pytest.raises(ValueError, match=r"tau_t must lie in \[0, 1\]"):
        DiT(cfg).apply({"params": params}, z, jnp.array([0.5, 0.5]), jnp.array([bad, 0.2]))


# 6 tokens of the 3 rows: 2 positions per chunk, which do not divide the 5 positions: padding.
@pytest.mark.parametrize("chunk", [0, 6])
def test_fused_capped_nll_matches_log_probs_and_its_gradients(chunk):
    from fmlm_jax.model import capped_nll

    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (3, 5, 8))
    kernel = 4.0 * jax.random.normal(keys[1], (8, 50))  # large logits: the cap is active
    bias = jax.random.normal(keys[2], (50,))
    tokens = jax.random.randint(keys[3], (3, 5), 0, 50)
    weights = jax.random.uniform(keys[4], (3, 5))  # a non-uniform upstream gradient

    def unfused(x, k, b):
        lp = log_probs(x @ k + b, 30.0)
        return (-jnp.take_along_axis(lp, tokens[..., None], -1)[..., 0] * weights).sum()

    def fused(x, k, b):
        return (capped_nll(x, k, b, tokens, 30.0, chunk) * weights).sum()

    assert float(jnp.abs(x @ kernel).max()) > 30.0
    want, want_grads = jax.value_and_grad(unfused, argnums=(0, 1, 2))(x, kernel, bias)
    got, got_grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(x, kernel, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="leading"):
        capped_nll(x, kernel, bias, tokens[:, :2])
    with pytest.raises(ValueError, match="kernel"):
        capped_nll(x, kernel[:4], bias, tokens)


# ----------------------------------------------------- the independent PyTorch DiT vs the authors
# tests/torch_dit.py (written here, not the authors' code) reproduces their fixture outputs, so
# that the parity tests above have an oracle that is not our own Flax code.

TORCH_REF_OUTPUTS = os.path.join(FIXTURES, "reference_outputs.npz")
TORCH_REF_NAMES = ["flm", "fmlm", "fmlm_llw"]
TORCH_REF_TWO_TIME = {"flm": False, "fmlm": True, "fmlm_llw": True}
TORCH_REF_HEADS = 3
TORCH_REF_TOL = 1e-4


def _ckpt(name):
    return os.path.join(FIXTURES, f"reference_{name}.ckpt")


@pytest.fixture(scope="module")
def torch_ref_outputs():
    with np.load(TORCH_REF_OUTPUTS) as d:
        return {k: d[k] for k in d.files}


def _run(model, torch_ref_outputs, name):
    z = torch.from_numpy(torch_ref_outputs[f"{name}/z"]).float()
    tau_s = torch.from_numpy(torch_ref_outputs[f"{name}/tau_s"]).float()
    tau_t = torch.from_numpy(torch_ref_outputs[f"{name}/tau_t"]).float() if TORCH_REF_TWO_TIME[name] else None
    with torch.no_grad():
        out = model(z, tau_s, tau_t)
    assert out.dtype == torch.float32
    assert out.shape == z.shape
    return out.numpy()


@pytest.mark.parametrize("name", TORCH_REF_NAMES)
@requires_torch
def test_torch_dit_config_inferred(name):
    sd, ema = load_reference_checkpoint(_ckpt(name))
    model = build_from_state_dict(sd, n_heads=TORCH_REF_HEADS)
    assert (model.vocab_size, model.hidden_size, model.cond_dim) == (61, 48, 24)
    assert len(model.blocks) == 2
    assert model.two_time == TORCH_REF_TWO_TIME[name]
    assert hasattr(model, "learnable_loss_weighting") == (name == "fmlm_llw")
    assert not any(k.startswith("teacher") or "inv_freq" in k for k in sd)
    assert ema is not None and len(ema) == len(sd)


@pytest.mark.parametrize("name", TORCH_REF_NAMES)
@requires_torch
def test_torch_dit_parameter_order_matches_checkpoint(name):
    ck = torch.load(_ckpt(name), map_location="cpu", weights_only=True)
    ck_keys = [k[len("backbone."):] for k in ck["state_dict"]]
    sd, _ = load_reference_checkpoint(_ckpt(name))
    model = build_from_state_dict(sd, n_heads=TORCH_REF_HEADS)
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


@pytest.mark.parametrize("name", TORCH_REF_NAMES)
@requires_torch
def test_torch_dit_logits_raw(name, torch_ref_outputs):
    sd, _ = load_reference_checkpoint(_ckpt(name))
    model = build_from_state_dict(sd, n_heads=TORCH_REF_HEADS)
    got = _run(model, torch_ref_outputs, name)
    diff = np.abs(got - torch_ref_outputs[f"{name}/logits_raw"]).max()
    assert diff <= TORCH_REF_TOL, f"{name} raw max abs diff {diff}"


@pytest.mark.parametrize("name", TORCH_REF_NAMES)
@requires_torch
def test_torch_dit_logits_ema(name, torch_ref_outputs):
    sd, ema = load_reference_checkpoint(_ckpt(name))
    model = apply_ema(build_from_state_dict(sd, n_heads=TORCH_REF_HEADS), ema)
    got = _run(model, torch_ref_outputs, name)
    diff = np.abs(got - torch_ref_outputs[f"{name}/logits_ema"]).max()
    assert diff <= TORCH_REF_TOL, f"{name} EMA max abs diff {diff}"
    # EMA weights differ from raw (raw + 0.02), so the outputs must too.
    assert np.abs(got - torch_ref_outputs[f"{name}/logits_raw"]).max() > 1e-2


@requires_torch
def test_torch_dit_loss_weight_ema(torch_ref_outputs):
    sd, ema = load_reference_checkpoint(_ckpt("fmlm_llw"))
    model = apply_ema(build_from_state_dict(sd, n_heads=TORCH_REF_HEADS), ema)
    tau_s = torch.from_numpy(torch_ref_outputs["fmlm_llw/tau_s"]).float()
    with torch.no_grad():
        w = model.loss_weight(tau_s).numpy()
    ref = torch_ref_outputs["fmlm_llw/loss_weight_ema"]
    assert w.shape == ref.shape == tau_s.shape
    diff = np.abs(w - ref).max()
    assert diff <= TORCH_REF_TOL, f"loss weight max abs diff {diff}"


@requires_torch
def test_torch_dit_apply_ema_length_mismatch():
    sd, ema = load_reference_checkpoint(_ckpt("flm"))
    model = build_from_state_dict(sd, n_heads=TORCH_REF_HEADS)
    with pytest.raises(ValueError):
        apply_ema(model, ema[:-1])


@requires_torch
def test_torch_dit_one_time_model_reuses_sigma_map_for_second_time(torch_ref_outputs):
    # No sigma_map_prime: a given tau_t goes through sigma_map as well (SPEC section 3 item 2).
    sd, _ = load_reference_checkpoint(_ckpt("flm"))
    model = build_from_state_dict(sd, n_heads=TORCH_REF_HEADS)
    z = torch.from_numpy(torch_ref_outputs["flm/z"]).float()
    tau_s = torch.from_numpy(torch_ref_outputs["flm/tau_s"]).float()
    tau_t = torch.from_numpy(torch_ref_outputs["flm/tau_t"]).float()
    with torch.no_grad():
        one = model(z, tau_s)
        two = model(z, tau_s, tau_t)
        c = torch.nn.functional.silu(model.sigma_map(tau_s) + model.sigma_map(tau_t))
        assert torch.allclose(model.conditioning(tau_s, tau_t), c)
    assert not torch.allclose(one, two)


@pytest.mark.parametrize(
    "two_time,llw,count", [(False, False, 130), (True, False, 134), (True, True, 142)]
)
@requires_torch
def test_torch_dit_named_tensor_counts_12_blocks(two_time, llw, count):
    model = TorchDiT(11, 16, 8, 2, 12, two_time=two_time, learnable_loss_weighting=llw)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == count
    assert len(set(names)) == count
    assert names[0] == "vocab_embed.embedding"
    assert names[-1] == "output_layer.adaLN_modulation.bias"
    assert [n for n, _ in model.named_buffers()] == ["rotary_emb.inv_freq"]
    assert model.rotary_emb.inv_freq.shape == (4,)  # head_dim 8 -> 4 frequencies
