"""The LM1B/OWT FMLM recipe at CPU size: PSD distillation of the model configs/tiny_flm.py trains.

    python -m fmlm_jax.main --config=configs/tiny_fmlm.py --workdir=runs/tiny_fmlm   # reads runs/tiny_flm
    launch/local.sh --config=configs/tiny_flm.py && launch/local.sh --config=configs/tiny_fmlm.py
"""

import os

from fmlm_jax import config as fmlm_config


def get_config():
    # Same data, model width and optimizer as its teacher ...
    config = fmlm_config.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_flm.py"))
    config.mode = "fmlm"
    config.model.two_time = True  # δ_{s,t}: adds sigma_map_prime(τ_t)
    # Global batch 64: 32 diagonal / 1 boundary / 31 off-diagonal rows.
    config.distill.update(method="psd", use_teacher=True,
                          teacher_path="runs/tiny_flm")  # launch/local.sh's default workdir for tiny_flm
    config.train.update(num_steps=400, b2=0.95)  # ... except β₂ = 0.95, as the published script
    config.sample.update(steps=(1, 2, 4, 8), gamma=0.8)
    return config


def sweep() -> list[dict]:
    """The three distillation objectives of SPEC §5."""
    return fmlm_config.grid(**{"distill.method": ["psd", "lsd", "esd"]})
