"""Checkpoint conversion: reference PyTorch (.ckpt, .safetensors) ↔ Orbax (fmlm_jax.convert).

Oracles: the authors' fixture checkpoints and outputs (tests/fixtures, float32; their EMA is
exactly raw + 0.02), and the independent PyTorch DiT tests/torch_dit.py with its loader
(`load_reference_checkpoint`, `build_from_state_dict`, `apply_ema`). Round trips are
compared bit for bit; Flax logits against the PyTorch module's to 1e-4.
"""

import collections
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmlm_jax import checkpoints, convert
from fmlm_jax import model as model_lib
from fmlm_jax.convert import cli as convert_cli
from fmlm_jax.model import DiT, model_config, param_shapes

torch = pytest.importorskip("torch")

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
from torch_dit import (  # noqa: E402
    TorchDiT,
    apply_ema,
    build_from_state_dict,
    load_reference_checkpoint,
    random_model,
)

FIXTURES = os.path.join(TESTS, "fixtures")
REPO = os.path.dirname(TESTS)
NAMES = ["flm", "fmlm", "fmlm_llw"]
TWO_TIME = {"flm": False, "fmlm": True, "fmlm_llw": True}
LLW = {"flm": False, "fmlm": False, "fmlm_llw": True}
FIXTURE_HEADS = 3
TOL = 1e-4
# A tiny random model, deliberately non-square (K ≠ d ≠ cond), head_dim 8.
VOCAB, HIDDEN, COND, HEADS, BLOCKS = 37, 32, 16, 4, 2
COMBOS = [(False, False), (False, True), (True, False), (True, True)]


def load_orbax(path, weights="ema"):
    """(params, model config) of an export (`checkpoints.load`)."""
    return checkpoints.load(path, weights)[:2]


def fixture(name):
    return os.path.join(FIXTURES, f"reference_{name}.ckpt")


def fixture_config(name, **overrides):
    with open(os.path.join(FIXTURES, "reference_meta.json")) as f:
        m = json.load(f)["model"]
    kw = dict(hidden_size=m["hidden_size"], cond_dim=m["cond_dim"], n_heads=m["n_heads"],
              n_blocks=m["n_blocks"], two_time=TWO_TIME[name],
              learnable_loss_weighting=LLW[name])
    kw.update(overrides)
    return model_config("small", m["vocab_size"], **kw)


def tload(path):
    return torch.load(path, map_location="cpu", weights_only=True)


_APPLY = {}


def flax_logits(cfg, params, z, tau_s, tau_t=None):
    """DiT(cfg) logits, float32 matmuls, one jit per model config (compiled once)."""
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _APPLY:
        _APPLY[key] = jax.jit(lambda p, z, s, t: DiT(cfg).apply({"params": p}, z, s, t))
    tau_t = None if tau_t is None else jnp.asarray(tau_t)
    with jax.default_matmul_precision("float32"):
        return np.asarray(_APPLY[key](params, jnp.asarray(z), jnp.asarray(tau_s), tau_t))


def flax_loss_weight(cfg, params, tau_s):
    with jax.default_matmul_precision("float32"):
        return np.asarray(DiT(cfg).apply({"params": params}, jnp.asarray(tau_s),
                                         method=DiT.loss_weight))


def torch_logits(model, z, tau_s, tau_t=None):
    as_t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))  # noqa: E731
    with torch.no_grad():
        return model(as_t(z), as_t(tau_s), as_t(tau_t)).numpy()


def reference_torch_model(path, use_ema):
    """The PyTorch oracle built by tests/torch_dit.py's loader from a .ckpt."""
    sd, ema = load_reference_checkpoint(path)
    model = build_from_state_dict(sd, n_heads=FIXTURE_HEADS)
    return apply_ema(model, ema) if use_ema else model


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def leaves_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
        for x, y in zip(la, lb, strict=True)
    )


def assert_same_ckpt(a, b):
    """Two .ckpt dicts hold the same tensors, bit for bit, in the same order."""
    assert list(a["state_dict"]) == list(b["state_dict"])
    for key, value in a["state_dict"].items():
        other = b["state_dict"][key]
        assert value.dtype == other.dtype and torch.equal(value, other), key
    assert ("ema" in a) == ("ema" in b)
    if "ema" in a:
        assert len(a["ema"]["shadow_params"]) == len(b["ema"]["shadow_params"])
        for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y)
        assert a["ema"]["decay"] == b["ema"]["decay"]
        assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]


def no_leftovers(directory):
    """No temporary files of an aborted write remain in `directory`."""
    return not [n for n in os.listdir(directory) if ".tmp-" in n]


@pytest.fixture(scope="module")
def ref_outputs():
    with np.load(os.path.join(FIXTURES, "reference_outputs.npz")) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each fixture converted once with the defaults (raw + EMA): {name: orbax dir}."""
    root = tmp_path_factory.mktemp("orbax")
    out = {}
    for name in NAMES:
        out[name] = str(root / name)
        convert_cli.torch_to_orbax(fixture(name), out[name])
    return out


def random_torch_model(two_time, llw, seed=0, std=0.2):
    return random_model(VOCAB, HIDDEN, COND, HEADS, BLOCKS, two_time, llw, seed, std)


def random_params(cfg, seed=0, std=0.2):
    """Every Flax parameter N(0, std²), drawn with numpy on `param_shapes` (no compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32), param_shapes(cfg))


def random_inputs(seed=0, batch=2, length=7, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(batch, length))
    t = rng.uniform(0.2, 0.9, size=(batch, 1, 1))
    z = (1 - t) * rng.standard_normal((batch, length, vocab)) + t * np.eye(vocab)[x]
    return (z.astype(np.float32), rng.uniform(0, 1, batch).astype(np.float32),
            rng.uniform(0, 1, batch).astype(np.float32))


def lightning_dict(model, ema_model, step=5):
    """A checkpoint dict in the released layout, from two TorchDiTs (raw and EMA)."""
    return {
        "state_dict": collections.OrderedDict(
            (f"backbone.{k}", v.clone()) for k, v in model.state_dict().items()),
        "ema": {"shadow_params": [p.detach().clone() for p in ema_model.parameters()],
                "num_updates": step, "decay": 0.999},
        "global_step": step,
        "epoch": 0,
    }


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", NAMES)
def test_fixture_round_trip_is_bit_exact(name, converted, tmp_path):
    back = tmp_path / "back.ckpt"
    convert_cli.orbax_to_torch(converted[name], back)
    original, written = tload(fixture(name)), tload(back)
    assert_same_ckpt(original, written)  # rotary buffer, order, EMA list, counters
    assert written["pytorch-lightning_version"] and "loops" in written
    # The test oracle's loader reads the written file and gives identical logits.
    z, tau_s, tau_t = random_inputs(vocab=61)
    tau_t = tau_t if TWO_TIME[name] else None
    for use_ema in (False, True):
        a = torch_logits(reference_torch_model(fixture(name), use_ema), z, tau_s, tau_t)
        b = torch_logits(reference_torch_model(str(back), use_ema), z, tau_s, tau_t)
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_raw_only_round_trip(name, tmp_path):
    convert_cli.torch_to_orbax(fixture(name), tmp_path / "o", weights="raw")
    assert checkpoints.read_meta(tmp_path / "o")[0]["weights"] == ["raw"]
    convert_cli.orbax_to_torch(tmp_path / "o", tmp_path / "raw.ckpt", weights="raw")
    original, written = tload(fixture(name)), tload(tmp_path / "raw.ckpt")
    assert "ema" not in written
    del original["ema"]
    assert_same_ckpt(original, written)


def test_jax_params_to_torch_and_back(tmp_path):
    """JAX-trained weights → Orbax → .ckpt: the PyTorch module gives the Flax logits."""
    cfg = model_config("small", VOCAB, hidden_size=HIDDEN, cond_dim=COND, n_heads=HEADS,
                       n_blocks=BLOCKS, two_time=True, learnable_loss_weighting=True)
    raw, ema = random_params(cfg, seed=0), jax.device_put(random_params(cfg, seed=10))
    checkpoints.export_params(tmp_path / "o", raw, ema, cfg, step=123)
    convert_cli.orbax_to_torch(tmp_path / "o", tmp_path / "jax.ckpt")
    ck = tload(tmp_path / "jax.ckpt")
    assert ck["global_step"] == 123
    assert ck["ema"]["num_updates"] == 123 and ck["ema"]["decay"] == checkpoints.DEFAULT_EMA_DECAY
    assert np.array_equal(ck["state_dict"]["backbone.rotary_emb.inv_freq"].numpy(),
                          1.0 / 10000 ** (np.arange(0, 8, 2, dtype=np.float32) / 8))
    z, tau_s, tau_t = random_inputs(1)
    for params, use_ema in ((raw, False), (ema, True)):
        sd, ema_list = load_reference_checkpoint(tmp_path / "jax.ckpt")
        model = build_from_state_dict(sd, n_heads=HEADS)
        model = apply_ema(model, ema_list) if use_ema else model
        got, want = torch_logits(model, z, tau_s, tau_t), flax_logits(cfg, params, z, tau_s, tau_t)
        assert max_diff(got, want) <= TOL
    # And back: .ckpt → params is the identity on the arrays.
    back_raw, back_cfg = convert.load_torch(tmp_path / "jax.ckpt", weights="raw")
    back_ema = convert.params_from_torch(tmp_path / "jax.ckpt", weights="ema")
    assert leaves_equal(back_raw, jax.tree_util.tree_map(np.asarray, raw))
    assert leaves_equal(back_ema, jax.tree_util.tree_map(np.asarray, ema))
    assert back_cfg.to_dict() == model_lib.resolve_config(cfg).to_dict()


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_flax_logits_of_converted_fixtures(name, weights, converted, ref_outputs):
    params, cfg = load_orbax(converted[name], weights)
    assert cfg.to_dict() == model_lib.resolve_config(fixture_config(name)).to_dict()
    z, tau_s = ref_outputs[f"{name}/z"], ref_outputs[f"{name}/tau_s"]
    tau_t = ref_outputs[f"{name}/tau_t"] if TWO_TIME[name] else None
    got = flax_logits(cfg, params, z, tau_s, tau_t)
    oracle = torch_logits(reference_torch_model(fixture(name), weights == "ema"), z, tau_s, tau_t)
    assert max_diff(got, oracle) <= TOL
    assert max_diff(got, ref_outputs[f"{name}/logits_{weights}"]) <= TOL
    if name == "fmlm_llw" and weights == "ema":
        w = flax_loss_weight(cfg, params, tau_s)
        assert max_diff(w, ref_outputs["fmlm_llw/loss_weight_ema"]) <= TOL


def test_ema_selection_is_raw_plus_0_02(converted):
    """The fixture EMA is raw + 0.02 (float32): each store and loader picks the right set."""
    for name in NAMES:
        raw, _ = load_orbax(converted[name], "raw")
        ema, _ = load_orbax(converted[name], "ema")
        plus = jax.tree_util.tree_map(lambda r: r + np.float32(0.02), raw)
        assert leaves_equal(ema, plus), name
        assert leaves_equal(convert.params_from_torch(fixture(name), weights="ema"), ema)
        assert leaves_equal(convert.params_from_torch(fixture(name), weights="raw"), raw)
        meta = checkpoints.read_meta(converted[name])[0]
        assert meta["ema"] == {"decay": 0.9999, "num_updates": 1} and meta["step"] == 1


@pytest.mark.parametrize("two_time,llw", COMBOS)
def test_random_torch_weights_parity(two_time, llw):
    """Random TorchDiT (raw and a separate EMA) → Flax: config inferred, logits equal."""
    model = random_torch_model(two_time, llw, seed=1)
    ema_model = random_torch_model(two_time, llw, seed=2)
    ckpt = lightning_dict(model, ema_model)
    z, tau_s, tau_t = random_inputs(3)
    tau_t = tau_t if two_time else None
    for weights, oracle in (("raw", model), ("ema", ema_model)):
        params, cfg = convert.load_torch(ckpt, weights=weights)  # heads from the rotary buffer
        assert (cfg.vocab_size, cfg.hidden_size, cfg.cond_dim, cfg.n_blocks, cfg.n_heads) == (
            VOCAB, HIDDEN, COND, BLOCKS, HEADS)
        assert (cfg.two_time, cfg.learnable_loss_weighting) == (two_time, llw)
        got = flax_logits(cfg, params, z, tau_s, tau_t)
        assert max_diff(got, torch_logits(oracle, z, tau_s, tau_t)) <= TOL
        if llw:
            with torch.no_grad():
                want = oracle.loss_weight(torch.from_numpy(tau_s)).numpy()
            assert max_diff(flax_loss_weight(cfg, params, tau_s), want) <= TOL


@pytest.mark.parametrize("two_time,llw", [(False, False), (True, True)])
def test_params_to_torch_loads_strictly(two_time, llw):
    cfg = model_config("small", VOCAB, hidden_size=HIDDEN, cond_dim=COND, n_heads=HEADS,
                       n_blocks=BLOCKS, two_time=two_time, learnable_loss_weighting=llw)
    params = jax.device_put(random_params(cfg, seed=4))  # jax arrays are accepted too
    sd = convert.params_to_torch(params, cfg)
    assert isinstance(sd, collections.OrderedDict)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in sd.values())
    model = TorchDiT(VOCAB, HIDDEN, COND, HEADS, BLOCKS, two_time=two_time,
                     learnable_loss_weighting=llw)
    assert list(sd) == [n for n, _ in model.named_parameters()]
    full = convert.params_to_torch(params, cfg, include_buffers=True)
    assert list(full) == list(model.state_dict())  # the buffer sits where torch puts it
    model.load_state_dict(full, strict=True)
    z, tau_s, tau_t = random_inputs(5)
    tau_t = tau_t if two_time else None
    assert max_diff(torch_logits(model, z, tau_s, tau_t),
                    flax_logits(cfg, params, z, tau_s, tau_t)) <= TOL
    assert leaves_equal(convert.params_from_torch(sd, weights="raw", n_heads=HEADS),
                        jax.tree_util.tree_map(np.asarray, params))


@pytest.mark.parametrize("name", NAMES)
def test_written_state_dict_matches_fixture_layout(name, converted):
    params, cfg = load_orbax(converted[name], "raw")
    sd = convert.params_to_torch(params, cfg, include_buffers=True)
    ck = tload(fixture(name))
    assert list(sd) == [k[len("backbone."):] for k in ck["state_dict"]]
    assert torch.equal(sd["rotary_emb.inv_freq"], ck["state_dict"]["backbone.rotary_emb.inv_freq"])


def test_published_layout_tensor_counts():
    for two_time, llw, count in ((False, False, 130), (True, False, 134), (True, True, 142)):
        cfg = model_config("small", 11, hidden_size=16, cond_dim=8, n_heads=2, n_blocks=12,
                           two_time=two_time, learnable_loss_weighting=llw)
        assert len(convert.reference_names(cfg)) == count
        assert convert.describe_layout(cfg).endswith(f"{count} tensors")


# ----------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_safetensors_round_trip(weights, converted, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    name = "fmlm_llw"
    path = tmp_path / f"{weights}.safetensors"
    convert_cli.orbax_to_torch(converted[name], path, weights=weights)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["weights"] == weights and meta["format"] == "pt"
    sd = load_file(str(path))
    assert all(v.dtype == torch.float32 for v in sd.values())
    ck = tload(fixture(name))
    assert sorted(keys) == sorted(k[len("backbone."):] for k in ck["state_dict"])
    # A PyTorch user loads it strictly and gets the fixture's logits, bit for bit.
    model = TorchDiT(61, 48, 24, FIXTURE_HEADS, 2, two_time=True, learnable_loss_weighting=True)
    model.load_state_dict(sd, strict=True)
    z, tau_s, tau_t = random_inputs(vocab=61)
    oracle = reference_torch_model(fixture(name), weights == "ema")
    assert np.array_equal(torch_logits(model, z, tau_s, tau_t),
                          torch_logits(oracle, z, tau_s, tau_t))
    # And back to Orbax: the same arrays.
    convert_cli.torch_to_orbax(path, tmp_path / "o", weights=weights)
    assert checkpoints.read_meta(tmp_path / "o")[0]["weights"] == [weights]
    assert leaves_equal(load_orbax(tmp_path / "o", weights)[0],
                        load_orbax(converted[name], weights)[0])
    other = "raw" if weights == "ema" else "ema"
    with pytest.raises(ValueError, match=f"holds {weights} weights.*--weights {weights}"):
        convert_cli.torch_to_orbax(path, tmp_path / "bad", weights=other)
    assert not os.path.exists(tmp_path / "bad")


def test_hf_style_safetensors_needs_heads(tmp_path):
    """Released safetensors: names without backbone., no metadata, maybe no rotary buffer."""
    from safetensors.numpy import save_file

    model = random_torch_model(True, False, seed=7)
    path = tmp_path / "model.safetensors"
    save_file({n: p.detach().numpy() for n, p in model.named_parameters()}, str(path))
    with pytest.raises(ValueError, match="n_heads cannot be inferred.*12 heads"):
        convert_cli.torch_to_orbax(path, tmp_path / "o")
    assert not os.path.exists(tmp_path / "o")
    convert_cli.torch_to_orbax(tmp_path, tmp_path / "o", n_heads=HEADS)  # a directory works too
    params, cfg = load_orbax(tmp_path / "o", "ema")
    z, tau_s, tau_t = random_inputs(8)
    assert max_diff(flax_logits(cfg, params, z, tau_s, tau_t),
                    torch_logits(model, z, tau_s, tau_t)) <= TOL


# ----------------------------------------------------------------------------- the CLI


def test_cli_round_trip(tmp_path, capsys):
    orbax_dir, ckpt, sft = tmp_path / "o", tmp_path / "back.ckpt", tmp_path / "back.safetensors"
    argv = ["torch-to-orbax", "--src", fixture("fmlm"), "--out", str(orbax_dir),
            "--vocab-size", "61", "--n-heads", "3"]
    assert convert_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "FMLM (two-time), 34 tensors" in out and "3 heads" in out
    assert convert_cli.main(["orbax-to-torch", "--src", str(orbax_dir), "--out", str(ckpt)]) == 0
    assert convert_cli.main(["orbax-to-torch", "--src", str(orbax_dir / "1"), "--out", str(sft),
                         "--weights", "raw"]) == 0
    assert_same_ckpt(tload(fixture("fmlm")), tload(ckpt))
    from safetensors.numpy import load_file

    raw = load_file(str(sft))
    ck = tload(fixture("fmlm"))
    assert all(np.array_equal(raw[k[len("backbone."):]], v.numpy())
               for k, v in ck["state_dict"].items())


@pytest.mark.slow  # a subprocess per command; the CLI in process: test_cli_round_trip, test_cli_errors
def test_cli_subprocess(tmp_path):
    """`python -m fmlm_jax.convert` end to end (error paths: `test_cli_errors`, in process)."""
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "fmlm_jax.convert", *a], capture_output=True, text=True, cwd=REPO)
    ok = run("torch-to-orbax", "--src", fixture("flm"), "--out", str(tmp_path / "o"))
    assert ok.returncode == 0, ok.stderr
    assert "FLM (one-time)" in ok.stdout
    assert load_orbax(tmp_path / "o")[1].n_heads == FIXTURE_HEADS
    back = run("orbax-to-torch", "--src", str(tmp_path / "o"), "--out", str(tmp_path / "b.ckpt"),
               "--vocab-size", "50258")
    assert back.returncode == 2 and "unrecognized arguments: --vocab-size" in back.stderr
    assert not os.path.exists(tmp_path / "b.ckpt")


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_cli.main(["torch-to-orbax", "--help"])
    assert "12 heads" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "o"
    argv = ["torch-to-orbax", "--src", fixture("fmlm"), "--out", str(out)]
    assert convert_cli.cli(argv + ["--size", "small"]) == 2
    assert "hidden_size: config 768, checkpoint 48" in capsys.readouterr().err
    assert convert_cli.cli(argv + ["--n-heads", "4"]) == 2
    assert "rotary buffer" in capsys.readouterr().err
    assert convert_cli.cli(["torch-to-orbax", "--src", str(tmp_path / "nope.ckpt"),
                            "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert convert_cli.cli(argv + ["--vocab-size", "50258"]) == 2
    assert "vocabulary size 61 but 50258 (gpt2 + [PAD]" in capsys.readouterr().err
    assert not os.path.exists(out) and no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name,wrong", [("fmlm", dict(two_time=False)),
                                        ("flm", dict(two_time=True)),
                                        ("fmlm_llw", dict(learnable_loss_weighting=False))])
def test_error_config_of_another_architecture(name, wrong, tmp_path):
    cfg = fixture_config(name, **wrong)
    field = next(iter(wrong))
    with pytest.raises(ValueError, match=f"do not fit the given model config: {field}: config "
                                         f"{wrong[field]}, checkpoint {not wrong[field]}"):
        convert_cli.torch_to_orbax(fixture(name), tmp_path / "o", config=cfg)
    assert not os.path.exists(tmp_path / "o")
    with pytest.raises(ValueError, match="sigma_map_prime" if field == "two_time" else "learnable"):
        convert.load_torch(fixture(name), config=cfg)
    # The right config passes and is returned.
    params, cfg = convert.load_torch(fixture(name), config=fixture_config(name))
    assert cfg.two_time == TWO_TIME[name]


def test_error_not_a_dit(tmp_path):
    path = tmp_path / "resnet.ckpt"
    torch.save({"state_dict": {"model.conv1.weight": torch.zeros(4, 3, 3, 3),
                               "model.fc.weight": torch.zeros(10, 4)}}, path)
    with pytest.raises(ValueError, match="not a DiT checkpoint.*model.conv1.weight"):
        convert_cli.torch_to_orbax(path, tmp_path / "o", weights="raw", n_heads=2)
    assert not os.path.exists(tmp_path / "o")
    with pytest.raises(ValueError, match="not a DiT checkpoint"):
        convert.params_from_torch({"encoder.weight": np.zeros((3, 3))}, weights="raw")
    # A torch file that is not a dict at all, and a file that is not torch.
    torch.save([torch.zeros(2)], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match="holds a list"):
        convert_cli.torch_to_orbax(tmp_path / "list.ckpt", tmp_path / "o")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        convert_cli.torch_to_orbax(tmp_path / "junk.ckpt", tmp_path / "o")
    assert not os.path.exists(tmp_path / "o") and no_leftovers(tmp_path)


@pytest.mark.parametrize("expected,tokenizer", [(30522, "bert-base-uncased"),
                                                 (50258, r"gpt2 \+ \[PAD\]")])
def test_error_vocab_size(expected, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=f"vocabulary size 61 but {expected} \\({tokenizer}"):
        convert_cli.torch_to_orbax(fixture("flm"), tmp_path / "o", expected_vocab_size=expected)
    assert not os.path.exists(tmp_path / "o")
    convert.load_torch(fixture("flm"), expected_vocab_size=61)  # a match passes


def test_error_ema_length(tmp_path):
    ck = tload(fixture("fmlm_llw"))
    ck["ema"]["shadow_params"] = ck["ema"]["shadow_params"][:-1]
    torch.save(ck, tmp_path / "short.ckpt")
    with pytest.raises(ValueError, match="EMA list has 41 tensors but the .* has 42 parameters"
                                         ".*silently truncate.*refuse"):
        convert_cli.torch_to_orbax(tmp_path / "short.ckpt", tmp_path / "o")
    assert not os.path.exists(tmp_path / "o")
    # The raw weights alone still convert.
    convert_cli.torch_to_orbax(tmp_path / "short.ckpt", tmp_path / "o", weights="raw")
    # An EMA list of the right length in the wrong order is refused too.
    ck = tload(fixture("flm"))
    ema = ck["ema"]["shadow_params"]
    ema[0], ema[1] = ema[1], ema[0]
    torch.save(ck, tmp_path / "shuffled.ckpt")
    with pytest.raises(ValueError, match=r"EMA entry 0 has shape \(24, 256\).*vocab_embed"):
        convert_cli.torch_to_orbax(tmp_path / "shuffled.ckpt", tmp_path / "o2")
    assert not os.path.exists(tmp_path / "o2")


def test_error_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_cli.torch_to_orbax(tmp_path / "nope.ckpt", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        convert_cli.orbax_to_torch(tmp_path / "nope", tmp_path / "y.ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_orbax(tmp_path / "nope")
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "y.ckpt")


def test_error_ema_requested_without_ema(tmp_path):
    ck = tload(fixture("fmlm"))
    del ck["ema"]
    torch.save(ck, tmp_path / "noema.ckpt")
    with pytest.raises(ValueError, match=r"no EMA weights.*--weights raw"):
        convert_cli.torch_to_orbax(tmp_path / "noema.ckpt", tmp_path / "o")
    assert not os.path.exists(tmp_path / "o")
    with pytest.raises(ValueError, match="weights='raw'"):
        convert.params_from_torch(tmp_path / "noema.ckpt")
    convert_cli.torch_to_orbax(tmp_path / "noema.ckpt", tmp_path / "o", weights="raw")
    # The raw-only Orbax checkpoint: EMA requests are refused, nothing is written.
    with pytest.raises(ValueError, match="holds no ema weights.*weights='raw'"):
        load_orbax(tmp_path / "o", "ema")
    with pytest.raises(ValueError, match="holds no ema weights"):
        convert_cli.orbax_to_torch(tmp_path / "o", tmp_path / "y.ckpt")
    with pytest.raises(ValueError, match="holds no ema weights"):
        convert_cli.orbax_to_torch(tmp_path / "o", tmp_path / "y.safetensors")
    assert not any(os.path.exists(tmp_path / n) for n in ("y.ckpt", "y.safetensors"))


def test_error_heads_and_outputs(tmp_path, converted):
    with pytest.raises(ValueError, match="n_heads=4 was given but .*rotary buffer.*3 heads"):
        convert_cli.torch_to_orbax(fixture("flm"), tmp_path / "o", n_heads=4)
    with pytest.raises(ValueError, match="must end with .ckpt"):
        convert_cli.orbax_to_torch(converted["flm"], tmp_path / "y.pt")
    with pytest.raises(ValueError, match="weights must be 'ema' or 'raw'"):
        convert_cli.torch_to_orbax(fixture("flm"), tmp_path / "o", weights="both")
    # Safetensors of EMA weights only cannot fill a .ckpt's state_dict.
    convert_cli.orbax_to_torch(converted["flm"], tmp_path / "e.safetensors")
    convert_cli.torch_to_orbax(tmp_path / "e.safetensors", tmp_path / "e")
    with pytest.raises(ValueError, match="no raw weights.*write a .safetensors"):
        convert_cli.orbax_to_torch(tmp_path / "e", tmp_path / "y.ckpt")
    assert not any(os.path.exists(tmp_path / n) for n in ("o", "y.pt", "y.ckpt"))


def test_existing_output_is_kept_unless_overwrite(tmp_path, converted):
    out = tmp_path / "y.ckpt"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
        convert_cli.orbax_to_torch(converted["flm"], out)
    assert out.read_bytes() == b"keep me"
    convert_cli.orbax_to_torch(converted["flm"], out, overwrite=True)
    assert_same_ckpt(tload(fixture("flm")), tload(out))
    with pytest.raises(FileExistsError, match="already exists"):
        convert_cli.torch_to_orbax(fixture("flm"), converted["flm"])
    convert_cli.torch_to_orbax(fixture("fmlm"), tmp_path / "d")
    convert_cli.torch_to_orbax(fixture("flm"), tmp_path / "d", overwrite=True)
    assert load_orbax(tmp_path / "d")[1].two_time is False
    assert no_leftovers(tmp_path)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch, converted):
    """A crash after data was written: no output, no temporary files, no new parents."""
    import orbax.checkpoint as ocp

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", boom)
    out = tmp_path / "a" / "b" / "o"
    with pytest.raises(OSError, match="disk full"):
        convert_cli.torch_to_orbax(fixture("fmlm"), out)
    assert not os.path.exists(tmp_path / "a") and no_leftovers(tmp_path)
    monkeypatch.undo()

    real_save = torch.save

    def partial_save(obj, f, *args, **kwargs):
        real_save({"half": torch.zeros(1)}, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError, match="disk full"):
        convert_cli.orbax_to_torch(converted["fmlm"], tmp_path / "y.ckpt")
    assert not os.path.exists(tmp_path / "y.ckpt") and no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- reading details


def test_compiled_teacher_and_extra_keys(tmp_path):
    """`._orig_mod.` is stripped, `teacher*` and non-backbone keys are dropped."""
    model = random_torch_model(True, False, seed=3)
    plain = lightning_dict(model, model)
    messy = dict(plain)
    messy["state_dict"] = collections.OrderedDict(
        (k.replace("backbone.", "backbone._orig_mod.", 1), v)
        for k, v in plain["state_dict"].items()
    )
    messy["state_dict"]["teacher_model.backbone.vocab_embed.embedding"] = torch.zeros(3, 3)
    messy["state_dict"]["noise.eps"] = torch.zeros(1)
    torch.save(messy, tmp_path / "messy.ckpt")
    ck = convert.read_torch_checkpoint(tmp_path / "messy.ckpt")
    assert ck.dropped == ["noise.eps", "teacher_model.backbone.vocab_embed.embedding"]
    for weights in ("raw", "ema"):
        assert leaves_equal(convert.params_from_torch(tmp_path / "messy.ckpt", weights=weights),
                            convert.params_from_torch(plain, weights=weights))


class _PickledConfig:  # stands in for the omegaconf config / tokenizer pickled by Lightning
    def __init__(self, value):
        self.value = value


def test_pickled_hyper_parameters_are_not_executed(tmp_path):
    ck = tload(fixture("flm"))
    ck["hyper_parameters"] = {"config": _PickledConfig({"model": "small"})}
    torch.save(ck, tmp_path / "hp.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        tload(tmp_path / "hp.ckpt")
    read = convert.read_torch_checkpoint(tmp_path / "hp.ckpt")
    assert any("placeholders" in note and "_PickledConfig" in note for note in read.notes)
    assert leaves_equal(convert.params_from_torch(read), convert.params_from_torch(fixture("flm")))


def test_orbax_layout_and_step_directory(converted):
    root = converted["fmlm_llw"]
    assert sorted(os.listdir(root)) == ["1"]
    assert sorted(n for n in os.listdir(os.path.join(root, "1")) if not n.startswith("_")
                  and not n.endswith(".txt")) == ["meta", "params"]
    meta = checkpoints.read_meta(root)[0]
    assert meta["format"] == checkpoints.EXPORT_FORMAT and meta["weights"] == ["ema", "raw"]
    assert meta["model_config"]["learnable_loss_weighting"] is True
    assert meta["num_params"] == sum(v.numel() for k, v in tload(fixture("fmlm_llw"))[
        "state_dict"].items() if "inv_freq" not in k)
    a, cfg_a = load_orbax(root, "ema")
    b, cfg_b = load_orbax(os.path.join(root, "1"), "ema")
    assert leaves_equal(a, b) and cfg_a == cfg_b
    with pytest.raises(ValueError, match="has no step 5"):
        checkpoints.read_meta(root, step=5)


def _omegaconf_modules(monkeypatch):
    """Stand-ins for omegaconf's DictConfig / AnyNode, registered under omegaconf's module names
    so that a checkpoint pickles them as the released files do (the converter never imports
    omegaconf: it reads their pickled state through placeholders)."""
    import types

    package = types.ModuleType("omegaconf")
    dictconfig, nodes = types.ModuleType("omegaconf.dictconfig"), types.ModuleType("omegaconf.nodes")

    class DictConfig:
        def __init__(self, content):
            self._metadata, self._parent = {"key": None}, None
            self._content = {k: (DictConfig(v) if isinstance(v, dict) else AnyNode(v))
                             for k, v in content.items()}

    class AnyNode:
        def __init__(self, value):
            self._val, self._metadata = value, {"optional": True}

    DictConfig.__module__, AnyNode.__module__ = dictconfig.__name__, nodes.__name__
    DictConfig.__qualname__, AnyNode.__qualname__ = "DictConfig", "AnyNode"
    dictconfig.DictConfig, nodes.AnyNode = DictConfig, AnyNode
    for module in (package, dictconfig, nodes):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return DictConfig


RELEASED_NAMES = {  # the legacy names of the released checkpoints' run configs
    "flm": {"algo": {"name": "dos_denoiser", "time_condition": "alpha_t"}, "training": {"loss_type": "ce"}},
    "fmlm": {"algo": {"name": "dos_denoiser", "time_condition": "alpha_t"}, "training": {"loss_type": "sd"}},
}


@pytest.mark.parametrize("name,stage", [("flm", "FLM"), ("fmlm", "FMLM-PSD")])
def test_released_legacy_hyper_parameters_are_reported(name, stage, tmp_path, monkeypatch, capsys):
    dict_config = _omegaconf_modules(monkeypatch)
    ck = tload(fixture(name))
    ck["hyper_parameters"] = {"config": dict_config(RELEASED_NAMES[name]), "tokenizer": _PickledConfig(1)}
    torch.save(ck, tmp_path / "released.ckpt")
    monkeypatch.delitem(sys.modules, "omegaconf")  # as on a user's machine without omegaconf
    read = convert.read_torch_checkpoint(tmp_path / "released.ckpt")
    loss_type = RELEASED_NAMES[name]["training"]["loss_type"]
    assert read.hyper_parameters["config"]["training"]["loss_type"] == loss_type
    recipe = convert.training_recipe(read.hyper_parameters, name == "fmlm", read.source)
    assert recipe["stage"] == stage and recipe["names"]["time_condition"] == "alpha_t"
    assert convert_cli.main(["torch-to-orbax", "--src", str(tmp_path / "released.ckpt"),
                         "--out", str(tmp_path / "out"), "--n-heads", "3"]) == 0
    out = capsys.readouterr().out
    assert f"recipe: {stage} (from algo.name=dos_denoiser" in out
    assert checkpoints.read_meta(str(tmp_path / "out"))[0]["recipe"]["stage"] == stage


def test_a_recipe_that_contradicts_the_tensors_or_the_time_is_refused():
    fmlm = {"config": RELEASED_NAMES["fmlm"]}
    with pytest.raises(ValueError, match="FMLM-PSD run .* but its tensors are one-time"):
        convert.training_recipe(fmlm, two_time=False, source="x.ckpt")
    other_time = {"config": {"algo": {"name": "dos_denoiser", "time_condition": "t"}}}
    with pytest.raises(ValueError, match="time_condition='t'"):
        convert.training_recipe(other_time, two_time=False, source="x.ckpt")
    with pytest.raises(ValueError, match="algo.name='mdlm'"):
        convert.training_recipe({"algo": {"name": "mdlm"}}, two_time=False, source="x.ckpt")
    assert convert.training_recipe({"lr": 3e-4}, two_time=True, source="x.ckpt") is None
