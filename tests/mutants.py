"""Planted bugs as a standing check: every mutant must be killed by the tests named beside it.

    python tests/mutants.py              # all mutants; exit 1 if any survives
    python tests/mutants.py --list       # names only
    python tests/mutants.py --only psd_student_at_the_midpoint,lsd_dtau_dt_at_s

For each mutant the package, tests and configs are copied to a temporary directory, one
snippet of the source is replaced (it must occur exactly once, so a mutant cannot go stale
silently), and the named tests run there against the copy (PYTHONPATH). A mutant is killed
when those tests fail; it survives when they pass. Its last line is one JSON object:
{"mutants": N, "killed": K, "survivors": [names]}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("fmlm_jax", "tests", "configs", "benchmarks", "pyproject.toml")


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the root
    why: str = ""


DISTILL = "fmlm_jax/objectives/distill/"
ASSEMBLY = "tests/test_distill.py::test_distill_loss_equals_the_numpy_assembly_of_the_spec"
TIMES = "tests/test_distill.py::test_times_follow_their_distributions"
ACCUMULATION = "tests/test_train.py::test_accumulated_gradient_equals_the_full_batch_gradient[fmlm]"
RECIPE = "tests/test_train.py::test_train_step_is_a_hand_adamw_with_clip_warm_up_and_ema"

MUTANTS = (
    # --- the eight bugs that once passed the suite (issue #18)
    Mutant("psd_student_at_the_midpoint", DISTILL + "loss.py",
           "log_p = nets.student(r.x, r.tau_s, r.tau_t)", "log_p = nets.student(r.x, r.tau_s, r.tau_u)",
           (ASSEMBLY,), "the PSD student evaluated at (τ_s, τ_u) instead of (τ_s, τ_t)"),
    Mutant("diagonal_target_ignores_the_teacher", DISTILL + "loss.py",
           "    if nets.teacher is None:  # self-distillation", "    if True:  # self-distillation",
           (ASSEMBLY,), "the diagonal rows trained towards the data one-hot although a teacher is given"),
    Mutant("esd_boundary_rows_not_masked", DISTILL + "loss.py",
           "return jnp.sum((delta - target) ** 2, axis=-1), r.t < 1.0",
           "return jnp.sum((delta - target) ** 2, axis=-1), jnp.ones_like(r.t, bool)",
           (ASSEMBLY,), "ESD's t = 1 rows left in the loss"),
    Mutant("lsd_dtau_dt_at_s", DISTILL + "loss.py",
           "schedule.dtau_dt(r.t), dc.entmax_temp_lsd", "schedule.dtau_dt(r.s), dc.entmax_temp_lsd",
           (ASSEMBLY,), "LSD's chain-rule factor dτ/dt taken at s instead of t"),
    Mutant("lsd_divides_by_dtau_dt", DISTILL + "targets.py",
           "d_delta_dt = delta * jax.lax.stop_gradient(dlog_p_dtau) * rows(dtau_dt_t)",
           "d_delta_dt = delta * jax.lax.stop_gradient(dlog_p_dtau) / rows(dtau_dt_t)",
           (ASSEMBLY, "tests/test_distill.py::test_lsd_target_with_a_non_identity_schedule"),
           "LSD divides by dτ/dt instead of multiplying"),
    Mutant("uniform_st_instead_of_uniform_diff", DISTILL + "rows.py",
           "off_s, off_t = offdiag_times(k_off, n_off, dc.offdiag_sampling)",
           'off_s, off_t = offdiag_times(k_off, n_off, "uniform_st")',
           (TIMES,), "off-diagonal times always drawn as two sorted uniforms"),
    Mutant("diagonal_tau_fixed_at_one_half", DISTILL + "rows.py",
           "diag = antithetic_uniform(k_diag, n_diag)", "diag = jnp.full((n_diag,), 0.5)",
           (TIMES,), "the diagonal rows all at τ = 0.5"),
    Mutant("projected_noise_uses_c_not_c_transposed", "fmlm_jax/interpolant.py",
           'noise = jnp.einsum("bld,de->ble", eps_d.astype(jnp.float32), noise_factor_t(embedding))',
           'noise = jnp.einsum("bld,de->ble", eps_d.astype(jnp.float32), noise_factor_t(embedding).T)',
           ("tests/test_interpolant.py::test_projected_noise_has_the_dense_covariance",),
           "projected noise ε̃·C instead of ε̃·Cᵀ (the wrong covariance)"),
    Mutant("residual_stream_in_bf16", "fmlm_jax/model.py",
           "h = h + (gate1 * o).astype(jnp.float32)  # the residual stream stays float32",
           "h = (h + gate1 * o).astype(self.dtype)",
           ("tests/test_model.py::test_bf16_policy_keeps_the_residual_stream_layernorms_and_outputs_float32",),
           "the residual stream stored in bf16 under the bf16 policy"),
    # --- one per fidelity item (issue #12) and per recipe piece (issue #18)
    Mutant("row_split_per_micro_batch", "fmlm_jax/train.py",
           "micro = jax.tree_util.tree_map(lambda x: _micro_batches(x, n), (batch, plan))",
           "micro = (jax.tree_util.tree_map(lambda x: _micro_batches(x, n), batch), jax.vmap("
           "lambda k: objective.draw_plan(k, batch['tokens'].shape[0] // n, config))("
           "jax.random.split(k_plan, n)))",
           (ACCUMULATION,), "gradient accumulation draws times and rows per micro-batch (no boundary rows)"),
    Mutant("one_shared_antithetic_offset", "fmlm_jax/objectives/flm.py",
           "u = jax.random.uniform(k_offset, (n,))", "u = jnp.full((n,), jax.random.uniform(k_offset))",
           ("tests/test_flm.py::test_antithetic_uniform_draws_one_offset_per_stratum",),
           "one antithetic offset shared by all strata instead of one per stratum"),
    Mutant("bf16_attention_scores", "fmlm_jax/model.py",
           'scores = jnp.einsum("blhd,bmhd->bhlm", q, k, preferred_element_type=jnp.float32)',
           'scores = jnp.einsum("blhd,bmhd->bhlm", q, k).astype(jnp.float32)',
           ("tests/test_model.py::test_bf16_attention_scores_are_accumulated_in_float32",),
           "QKᵀ accumulated in bf16"),
    Mutant("decoding_without_the_clean_up", "fmlm_jax/data/tokenizers.py",
           "return [clean_up_tokenization(text) for text in texts]", "return list(texts)",
           ("tests/test_data.py::test_decoding_keeps_special_tokens_and_cleans_up_like_transformers_4",),
           "samples decoded without the transformers-4 clean-up"),
    Mutant("detokenizer_joins_negations", "fmlm_jax/data/sources.py",
           '    ("replace", "http : / / ", "http://"),',
           '    ("replace", " n\'t", "n\'t"),\n    ("replace", "http : / / ", "http://"),',
           ("tests/test_data.py::test_lm1b_detokenizer_has_no_negation_rule",), "an added \"n't\" rule"),
    Mutant("ema_targets_with_dropout", DISTILL + "loss.py",
           'ema = network("ema", ema_params, mc) if _ema_targets(config) else None',
           'ema = network("ema", ema_params, mc, train=True, rng=k_target1) '
           'if _ema_targets(config) else None',
           (ASSEMBLY,), "PSD's EMA targets evaluated in train mode (dropout)"),
    Mutant("entmax_alpha_read_as_a_temperature", DISTILL + "targets.py",
           "    if alpha == 2.0:\n        return sparsemax(z)",
           "    if alpha >= 1.0:\n        return sparsemax(z / alpha)",
           (ASSEMBLY,), "entmax_temp_lsd used as a temperature of sparsemax"),
    Mutant("adam_betas_swapped", "fmlm_jax/train.py",
           "b1=train_config.b1,", "b1=train_config.b2,", (RECIPE,), "AdamW given β₂ as β₁"),
    Mutant("no_gradient_clip", "fmlm_jax/train.py",
           "optax.clip_by_global_norm(train_config.grad_clip),", "optax.identity(),",
           (RECIPE,), "the global-norm clip dropped"),
    Mutant("ema_decay_without_warm_up", "fmlm_jax/train.py",
           "return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))",
           "return jnp.asarray(max_decay, jnp.float32)",
           (RECIPE,), "the EMA decay without its (1 + n)/(10 + n) warm-up"),
    Mutant("legacy_sd_read_as_flm", "fmlm_jax/convert/torch_io.py",
           'LOSS_TYPES = {"sd": "psd",', 'LOSS_TYPES = {"sd_": "psd",',
           ("tests/test_convert.py::test_released_legacy_hyper_parameters_are_reported",),
           "the released training.loss_type=sd not recognised as FMLM-PSD"),
    # --- the token-chunked distillation losses and the fused attention kernels (issue #16)
    Mutant("chunked_psd_student_at_the_midpoint", DISTILL + "chunked.py",
           "    f = s_parts.trunk(h[s_name], r.tau_s, r.tau_t)\n    lam",
           "    f = s_parts.trunk(h[s_name], r.tau_s, r.tau_u)\n    lam",
           (ASSEMBLY,), "the chunked PSD student evaluated at (τ_s, τ_u) instead of (τ_s, τ_t)"),
    Mutant("lsd_esd_jvp_through_the_kernel", DISTILL + "loss.py",
           'else student(k_off, attention_impl="xla"))', "else student(k_off))",
           ("tests/test_distill.py::test_lsd_esd_with_a_fused_kernel_take_the_jvp_through_xla",),
           "LSD/ESD's jvp taken through the fused attention kernel (a custom VJP: no jvp)"),
    Mutant("sharding_imports_train", "fmlm_jax/sharding.py",
           "\nimport jax\n", "\nimport jax\n\nfrom fmlm_jax import train  # noqa: F401\n",
           ("tests/test_package.py",), "an import cycle (sharding ↔ train)"),
)


def _copy_tree(dest: str) -> None:
    for name in COPIED:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, dest)


def _apply(dest: str, mutant: Mutant) -> None:
    path = os.path.join(dest, mutant.path)
    with open(path) as f:
        source = f.read()
    count = source.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: the snippet occurs {count} times in {mutant.path} "
                         "(expected once); update tests/mutants.py")
    with open(path, "w") as f:
        f.write(source.replace(mutant.old, mutant.new))


def run_mutant(mutant: Mutant, python: str) -> tuple[str, float, str]:
    """('killed' | 'survived' | 'error', seconds, pytest's last lines)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as dest:
        _copy_tree(dest)
        _apply(dest, mutant)
        env = dict(os.environ, PYTHONPATH=dest)
        cmd = [python, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
               "-o", "addopts=", *mutant.tests]
        start = time.time()
        proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
        seconds = time.time() - start
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    outcome = {0: "survived", 1: "killed"}.get(proc.returncode, "error")
    return outcome, seconds, tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true")
    p.add_argument("--only", default="", help="comma-separated mutant names")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name}: {m.why} [{', '.join(m.tests)}]")
        return 0
    if args.only and len(chosen) != len(set(args.only.split(","))):
        raise SystemExit(f"unknown mutant in --only: {args.only}")
    survivors, errors = [], []
    for m in chosen:
        outcome, seconds, tail = run_mutant(m, sys.executable)
        print(f"{outcome:>8}  {m.name}  ({seconds:.0f} s)  {m.why}", flush=True)
        if outcome != "killed":
            print("          " + tail.replace("\n", "\n          "), flush=True)
            (survivors if outcome == "survived" else errors).append(m.name)
    print(json.dumps({"mutants": len(chosen), "killed": len(chosen) - len(survivors) - len(errors),
                      "survivors": survivors, "errors": errors}))
    return 1 if survivors or errors else 0


if __name__ == "__main__":
    sys.exit(main())
