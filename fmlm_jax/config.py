"""The run config: every group's complete defaults, `validate()`, and `load(path[:variant])`.

A run is decided by one `ml_collections.ConfigDict` with the groups below. `defaults(mode)`
returns all of them with the reference recipe's values (SPEC §3–§8); a config file
(configs/*.py) starts from it and writes out its own numbers, so it reads like the paper's
hyper-parameter table:

    from fmlm_jax import config as fmlm_config

    def get_config():
        config = fmlm_config.defaults("flm")
        config.data.update(source="prepared", dir="data/lm1b", seq_len=128, batch_size=512)
        config.model.update(fmlm_config.model_size("small"), vocab_size=30522, dtype="bfloat16")
        return config

Groups: `seed`, `mode` ('flm': FLM training, stage 1; 'fmlm': FMLM distillation, stage 2),
`data`, `model`, `flm`, `distill`, `train`, `mesh`, `sample`, `eval`. `validate` refuses
unknown or missing keys and values out of range with one message listing every problem;
`load` reads a config file with absl's own loader (the one `--config=` uses) and validates.
Checkpoints written before the rename carry mode 'train' / 'distill' (`LEGACY_MODES`).
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re

import ml_collections
from ml_collections import config_dict
from ml_collections.config_flags import config_flags as absl_config_files  # its file loader

MODES = ("flm", "fmlm")
LEGACY_MODES = {"train": "flm", "distill": "fmlm"}  # the names older checkpoints carry
DISTILL_METHODS = ("psd", "lsd", "esd")
OFFDIAG_SAMPLINGS = ("uniform_diff", "uniform_st")
DATA_SOURCES = ("synthetic", "prepared")
LR_SCHEDULES = ("constant", "cosine")
DTYPES = ("float32", "bfloat16")
# model.attention_impl: our XLA einsum, or a tokamax kernel (fmlm_jax/kernels.py, the optional
# extra fmlm-jax[kernels]); which run on which platform is fmlm_jax.kernels.PLATFORMS.
# No 'cudnn': tokamax's cuDNN attention refuses a logit softcap (see fmlm_jax/kernels.py).
ATTENTION_IMPLS = ("xla", "xla_chunked", "triton", "mosaic")

# SPEC §3: (hidden_size, n_blocks, n_heads, cond_dim) of the published sizes.
MODEL_SIZES = {
    "tiny": (256, 8, 8, 128),
    "small": (768, 12, 12, 128),
    "medium": (1024, 24, 16, 128),
    "xlarge": (1600, 48, 25, 128),
}
# Model fields a checkpoint written before they existed may lack, with the reference values.
MODEL_OPTIONAL_DEFAULTS = {
    "mlp_ratio": 4,
    "attn_softcap": 50.0,  # scores → 50·tanh(scores / 50)
    "output_cap": 30.0,  # logits → 30·tanh(logits / 30) before the log-softmax
    "dtype": "float32",  # compute dtype of the blocks and final layer ('bfloat16' for speed)
    "param_dtype": "float32",
    # How attention is computed (fmlm_jax.kernels): 'xla' = the float32-score einsum, the
    # one path jax.jvp can go through; a tokamax kernel otherwise. Not part of the architecture.
    "attention_impl": "xla",
}


def model_size(size: str) -> dict:
    """{hidden_size, n_blocks, n_heads, cond_dim} of a SPEC size ('tiny', 'small', ...)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    hidden, blocks, heads, cond = MODEL_SIZES[size]
    return dict(hidden_size=hidden, n_blocks=blocks, n_heads=heads, cond_dim=cond)


def model_group(size: str = "small", vocab_size: int = 30522, **overrides) -> ml_collections.ConfigDict:
    """The complete `model` group of a SPEC size; `overrides` replace fields (KeyError if unknown)."""
    group = ml_collections.ConfigDict(dict(
        vocab_size=vocab_size,
        **model_size(size),
        dropout=0.1,
        two_time=False,  # FMLM students: δ_{s,t} with sigma_map_prime(τ_t)
        learnable_loss_weighting=False,
        **MODEL_OPTIONAL_DEFAULTS,
    ))
    for key, value in overrides.items():
        if key not in group:
            raise KeyError(f"model config has no field {key!r}; fields are {sorted(group)}")
        group[key] = value
    return group


def defaults(mode: str = "flm") -> ml_collections.ConfigDict:
    """The complete config of every group for `mode`, at the reference recipe's values."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} ('flm': FLM training, 'fmlm': FMLM distillation), "
                         f"got {mode!r}")
    fmlm = mode == "fmlm"
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.mode = mode
    config.data = dict(
        source="synthetic",  # 'synthetic' (built-in phrases) | 'prepared' (python -m fmlm_jax.data.prepare)
        dir="",  # the prepared-data directory (source='prepared')
        tokenizer="",  # the model's tokenizer; '' = the one the prepared data names
        seq_len=128,  # L
        batch_size=512,  # the GLOBAL batch N
        valid_split="validation",  # LM1B: 'test'
        plays=(),  # the Shakespeare corpus of the demo only: () = every play
    )
    config.model = model_group("small", 30522, two_time=fmlm)
    config.flm = dict(
        tau_min=0.0,
        tau_max=1.0,
        projected_noise=False,  # SPEC §10: draw x_t·E from d-dimensional noise
        # tokens per fused-CE chunk over the whole batch; None = per backend × device count
        ce_chunk_size=config_dict.placeholder(int),
    )
    config.distill = dict(
        method="psd",  # 'psd' (released) | 'lsd' | 'esd'
        use_teacher=True,  # False: self-distillation
        teacher_path="",  # the FLM teacher: a training workdir, an export or a reference .ckpt
        diagonal_fraction=0.5,  # f
        boundary_prob=32.0,  # P: ⌊N·(f + (1−f)/P)⌋ − ⌊N·f⌋ rows at (τ_s, τ_t) = (0, 1)
        offdiag_sampling="uniform_diff",
        use_mse_loss_psd=False,  # both PSD terms as Σ(δ − target)²
        rescale_offdiag_loss_psd=False,
        use_ema_for_psd_target=False,  # PSD targets from the EMA weights (eval mode)
        use_teacher_for_D_t_lsd=False,  # LSD's D_t: the teacher instead of the student's δ_{t,t}
        entmax_temp_lsd=2.0,  # LSD: the entmax α of the target projection (2 = sparsemax)
        # Tokens per chunk of the vocabulary-wide loss (targets, teacher probabilities, the
        # student's log δ): no (N, L, K) tensor is live at once. 0 = unchunked (one pass).
        chunk_size=config_dict.placeholder(int),  # None = per backend × device count (as flm's)
    )
    config.train = dict(
        num_steps=1_000_000,
        lr=3e-4,
        schedule="constant",  # linear warm-up then constant | 'cosine' to final_lr_fraction·lr
        final_lr_fraction=0.0,
        warmup_steps=2500,
        b1=0.9,
        b2=0.95 if fmlm else 0.999,  # the published distillation script uses 0.95
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,
        ema_decay=0.9999,  # min(0.9999, (1 + n)/(10 + n)) after every step
        grad_accum_steps=1,
        log_every=100,
        save_every=5000,
        keep_last=3,
        keep_every=0,  # also keep steps divisible by this (0: none)
        eval_every=0,  # validation loss every N steps (0: never)
        eval_batches=4,
        sample_every=0,  # periodic samples every N steps (0: never)
        sample_num=4,
        sample_steps=32,  # FLM Euler steps of periodic samples (FMLM: one step, γ = 0)
        peak_tflops=0.0,  # the device's dense bf16 peak for MFU; 0 = from the device table
    )
    config.mesh = dict(data=-1, fsdp=1)  # ('data', 'fsdp') sizes; -1 = every device left
    config.sample = dict(
        steps=(1, 2, 4, 8, 16, 32) if fmlm else (8, 16, 32, 64, 128, 256, 512, 1024),
        num_samples=1024,
        batch_size=128,
        gamma=0.8 if fmlm else 0.0,  # FMLM γ-sampler (SPEC §6: 0.8 LM1B, 1.0 OWT)
    )
    config.eval = dict(evaluator="gpt2-large", batch_size=8)
    return config


def grid(**axes) -> list[dict]:
    """The cartesian product of sweep axes as override dicts, for a config file's `sweep()`:

    grid(**{"train.lr": [1e-4, 3e-4], "seed": [0, 1]}) →
    [{"train.lr": 1e-4, "seed": 0}, {"train.lr": 1e-4, "seed": 1}, ...]
    """
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]


# ============================================================================ validation


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _structure_problems(config) -> list[str]:
    reference = defaults(config.get("mode") if config.get("mode") in MODES else "flm")
    problems = []
    for key in config.keys():
        if key not in reference:
            problems.append(f"unknown key {key!r}{_suggest(key, reference.keys())}")
    for key in reference.keys():
        if key not in config:
            problems.append(f"missing key {key!r}")
            continue
        want, have = reference[key], config[key]
        if isinstance(want, ml_collections.ConfigDict):
            if not hasattr(have, "keys"):
                problems.append(f"{key} must be a group, got {have!r}")
                continue
            problems += [f"unknown key {key}.{k}{_suggest(k, want.keys())}"
                         for k in have.keys() if k not in want]
            problems += [f"missing key {key}.{k}" for k in want.keys() if k not in have]
    return problems


def _value_problems(config) -> list[str]:
    c = config
    problems = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    def choice(value, allowed, name):
        check(value in allowed, f"{name} must be one of {allowed}, got {value!r}")

    if c.mode in LEGACY_MODES:
        problems.append(f"mode {c.mode!r} was renamed {LEGACY_MODES[c.mode]!r}")
    else:
        choice(c.mode, MODES, "mode")
    choice(c.data.source, DATA_SOURCES, "data.source")
    check(c.data.seq_len >= 3, f"data.seq_len must be at least 3, got {c.data.seq_len}")
    check(c.data.batch_size >= 1, f"data.batch_size must be positive, got {c.data.batch_size}")
    m = c.model
    for name in ("vocab_size", "hidden_size", "cond_dim", "n_blocks", "n_heads", "mlp_ratio"):
        check(int(m[name]) >= 1, f"model.{name} must be positive, got {m[name]}")
    check(m.hidden_size % max(m.n_heads, 1) == 0,
          f"model.hidden_size {m.hidden_size} is not divisible by model.n_heads {m.n_heads}")
    check((m.hidden_size // max(m.n_heads, 1)) % 2 == 0, "rotary embeddings need an even head dimension "
          f"(model.hidden_size / model.n_heads = {m.hidden_size / max(m.n_heads, 1):g})")
    check(0.0 <= m.dropout < 1.0, f"model.dropout must lie in [0, 1), got {m.dropout}")
    choice(m.dtype, DTYPES, "model.dtype")
    choice(m.param_dtype, DTYPES, "model.param_dtype")
    choice(m.attention_impl, ATTENTION_IMPLS, "model.attention_impl")
    if c.mode == "fmlm":
        check(m.two_time, "mode='fmlm' trains a two-time student: set model.two_time=True")
    elif c.mode == "flm":
        check(not m.two_time, "mode='flm' trains a one-time denoiser: set model.two_time=False")
    check(0.0 <= c.flm.tau_min <= c.flm.tau_max <= 1.0,
          f"need 0 <= flm.tau_min <= flm.tau_max <= 1, got {c.flm.tau_min}, {c.flm.tau_max}")
    d = c.distill
    choice(d.method, DISTILL_METHODS, "distill.method")
    choice(d.offdiag_sampling, OFFDIAG_SAMPLINGS, "distill.offdiag_sampling")
    check(0.0 <= d.diagonal_fraction < 1.0, f"distill.diagonal_fraction must lie in [0, 1), got "
          f"{d.diagonal_fraction}")
    check(d.boundary_prob >= 1.0, f"distill.boundary_prob must be >= 1, got {d.boundary_prob}")
    check(d.chunk_size is None or int(d.chunk_size) >= 0,
          f"distill.chunk_size must be >= 0 tokens (0 = unchunked) or None (per backend), got {d.chunk_size}")
    check(1.0 < d.entmax_temp_lsd <= 2.0, "distill.entmax_temp_lsd is the entmax α of LSD's target "
          f"projection and must lie in (1, 2] (2 = sparsemax), got {d.entmax_temp_lsd}")
    t = c.train
    choice(t.schedule, LR_SCHEDULES, "train.schedule")
    for name in ("num_steps", "log_every", "save_every", "grad_accum_steps", "eval_batches", "sample_num",
                 "sample_steps"):
        check(int(t[name]) >= 1, f"train.{name} must be positive, got {t[name]}")
    check(t.warmup_steps >= 0 and t.keep_every >= 0 and t.eval_every >= 0 and t.sample_every >= 0,
          "train.warmup_steps, keep_every, eval_every and sample_every must be >= 0")
    accumulation = max(int(t.grad_accum_steps), 1)
    check(c.data.batch_size % accumulation == 0, f"train.grad_accum_steps {t.grad_accum_steps} must divide "
          f"data.batch_size {c.data.batch_size}")
    if c.mode == "fmlm" and accumulation > 1:
        n_diag = math.floor(c.data.batch_size * d.diagonal_fraction)
        check(n_diag % accumulation == 0, f"the {n_diag} diagonal rows of data.batch_size "
              f"{c.data.batch_size} do not split evenly over train.grad_accum_steps={accumulation} "
              "micro-batches; pick a batch size or accumulation for which "
              "⌊batch·distill.diagonal_fraction⌋ is divisible by grad_accum_steps")
    check(0.0 <= c.sample.gamma <= 1.0, f"sample.gamma must lie in [0, 1], got {c.sample.gamma}")
    check(all(int(s) >= 1 for s in c.sample.steps), f"sample.steps must be positive, got {c.sample.steps}")
    return problems


def validate(config) -> ml_collections.ConfigDict:
    """`config` itself if it is a complete, consistent run config; otherwise ValueError
    listing every problem (unknown or missing keys, values out of range) and the fix."""
    if not isinstance(config, ml_collections.ConfigDict):
        getattr(config, "mode", None)  # absl's placeholder for a config file that failed to load raises here
        raise ValueError(f"a run config is an ml_collections.ConfigDict, got {type(config).__name__}")
    problems = _structure_problems(config)
    if not problems:
        problems = _value_problems(config)
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems)
                         + ". Build configs from fmlm_jax.config.defaults(mode) (see configs/).")
    return config


def _module(path: str):
    """A config file as a module, by absl's config-file loader (the one `--config=` uses)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path!r}; pass e.g. configs/lm1b_flm.py (or PATH:VARIANT)")
    # One module name per file: absl's loader re-executes a module already loaded under its
    # name, so a config file that loads another one would otherwise overwrite itself.
    name = "fmlm_config_" + re.sub(r"\W", "_", os.path.abspath(path))
    return absl_config_files._LoadConfigModule(name, path)  # noqa: SLF001 - absl's own loader


def load(spec: str) -> ml_collections.ConfigDict:
    """The validated config of a file, `path` or `path:variant` (get_config(variant))."""
    path, *variant = spec.split(":", 1)
    config = _module(path).get_config(*variant)
    if config is None:
        raise ValueError(f"{path}: get_config() returned None (a missing return?)")
    return validate(config)


def sweep(path: str) -> list[dict]:
    """A config file's sweep points (its optional `sweep()`: override dicts keyed by config
    path without the leading 'config.'); [{}] (one job) when it has none."""
    module = _module(path)
    return list(module.sweep()) if hasattr(module, "sweep") else [{}]
