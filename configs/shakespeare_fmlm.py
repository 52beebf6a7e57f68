"""The embedded demo's FMLM: PSD distillation (SPEC §5) of the FLM of configs/shakespeare_flm.py.

python -m fmlm_jax.main --config=configs/shakespeare_fmlm.py --workdir=runs/demo/fmlm \
    --config.data.dir=runs/demo/data --config.distill.teacher_path=runs/demo/flm   # this stage alone
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path
import shakespeare_flm  # noqa: E402


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = shakespeare_flm.get_config(variant)
    quick = variant == "quick"
    config.mode = "distill"
    config.model.two_time = True
    config.flm.projected_noise = False  # distillation draws dense noise (SPEC §5)
    config.data.batch_size = 8 if quick else 32
    config.train.update(num_steps=2 if quick else 200, lr=1e-3, warmup_steps=1 if quick else 25)
    config.distill = ml_collections.ConfigDict(dict(
        method="psd",
        use_teacher=True,
        teacher_path="",  # set by the demo: WORKDIR/flm
        diagonal_fraction=0.5,
        # 4, not the paper's 32: with 32 rows a batch gets 4 boundary (0 → 1) rows instead of
        # none, and the boundary map is the one-step sampler.
        boundary_prob=4.0,
        offdiag_sampling="uniform_diff",
        use_mse_loss_psd=False,
        rescale_offdiag_loss_psd=False,
        use_ema_for_psd_target=False,
        use_teacher_for_D_t_lsd=False,
        entmax_temp_lsd=2.0,
    ))
    config.sample.update(steps=(1, 2) if quick else (1, 2, 4, 8), gamma=0.8)  # SPEC §6: γ = 0.8 on LM1B
    return config
