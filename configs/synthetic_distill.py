"""FMLM distillation (PSD) of the synthetic-phrase FLM trained by configs/synthetic_demo.py.

python -m fmlm_jax.main --config=configs/synthetic_distill.py --workdir=runs/fmlm \
    --config.distill.teacher_path=runs/flm
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path
import synthetic_demo  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = synthetic_demo.get_config()
    config.mode = "distill"
    config.model.two_time = True
    config.distill = ml_collections.ConfigDict(
        dict(
            method="psd",  # 'psd' | 'lsd' | 'esd'
            use_teacher=True,  # False: self-distillation
            teacher_path="",  # a training workdir or a converted checkpoint directory
            diagonal_fraction=0.5,
            boundary_prob=32.0,
            offdiag_sampling="uniform_diff",  # or 'uniform_st'
            use_mse_loss_psd=False,
            rescale_offdiag_loss_psd=False,
            use_ema_for_psd_target=False,
            use_teacher_for_D_t_lsd=False,
            entmax_temp_lsd=2.0,
        )
    )
    return config
