"""The embedded demo's FMLM: PSD distillation (SPEC §5) of the FLM of configs/shakespeare_flm.py.

python -m fmlm_jax.main --config=configs/shakespeare_fmlm.py --workdir=runs/demo/fmlm \
    --config.data.dir=runs/demo/data --config.distill.teacher_path=runs/demo/flm   # this stage alone
"""

import os

from fmlm_jax import config as fmlm_config


def get_config(variant: str = ""):
    flm = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_flm.py")
    config = fmlm_config.load(flm + (f":{variant}" if variant else ""))
    quick = variant == "quick"
    num_steps = 100 if quick else 300
    config.mode = "fmlm"
    config.model.two_time = True
    config.flm.projected_noise = False  # distillation draws dense noise (SPEC §5)
    config.data.batch_size = 32
    config.train.update(
        num_steps=num_steps, lr=1e-3, warmup_steps=5 if quick else 25, b2=0.999, schedule="constant",
        log_every=10 if quick else 25,
        save_every=num_steps // 4, keep_every=num_steps // 4,  # the 1/4 step: a weak FMLM for autoguidance
    )
    config.distill.update(
        method="psd",
        use_teacher=True,
        teacher_path="",  # set by the demo: WORKDIR/flm
        diagonal_fraction=0.5,
        # 4, not the paper's 32: with 32 rows a batch gets 4 boundary (0 → 1) rows instead of
        # none, and the boundary map is the one-step sampler.
        boundary_prob=4.0,
        offdiag_sampling="uniform_diff",
    )
    config.sample.update(steps=(1, 2) if quick else (1, 2, 4, 8), gamma=0.8)  # SPEC §6: γ = 0.8 on LM1B
    return config
