"""Pieces shared by the paper configs (configs/{lm1b,owt}_{flm,fmlm}.py) and their CPU versions.

Only what is identical across runs lives here; each run's numbers are written out in its own
file so that it reads like the paper's hyper-parameter table.
"""

import itertools

import ml_collections


def psd_distill(teacher_path: str = "") -> ml_collections.ConfigDict:
    """config.distill of the released FMLMs: PSD from a frozen FLM teacher (SPEC §5)."""
    return ml_collections.ConfigDict(
        dict(
            method="psd",  # 'psd' (released) | 'lsd' | 'esd'
            use_teacher=True,  # False: self-distillation
            teacher_path=teacher_path,  # an FLM training workdir or a converted checkpoint directory
            diagonal_fraction=0.5,  # f: rows with τ_s = τ_t
            boundary_prob=32.0,  # P: ⌊N·(f + (1−f)/P)⌋ − ⌊N·f⌋ rows at (τ_s, τ_t) = (0, 1)
            offdiag_sampling="uniform_diff",  # or 'uniform_st'
            use_mse_loss_psd=False,
            rescale_offdiag_loss_psd=False,
            use_ema_for_psd_target=False,  # PSD targets from the student's current weights
            use_teacher_for_D_t_lsd=False,  # LSD only (reference default: the student's δ_{t,t})
            entmax_temp_lsd=2.0,  # LSD only: the entmax α of the target projection (2 = sparsemax)
        )
    )


def mesh(data: int = -1, fsdp: int = 1) -> ml_collections.ConfigDict:
    """config.mesh: ('data', 'fsdp') sizes; data=-1 takes every device not used by fsdp."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))


def grid(**axes) -> list[dict]:
    """The cartesian product of sweep axes as override dicts, e.g.

    grid(**{"train.lr": [1e-4, 3e-4], "seed": [0, 1]}) →
    [{"train.lr": 1e-4, "seed": 0}, {"train.lr": 1e-4, "seed": 1}, ...]

    Keys are config paths without the leading 'config.'; launchers turn each dict into
    `--config.KEY=VALUE` flags, one job per dict.
    """
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]
