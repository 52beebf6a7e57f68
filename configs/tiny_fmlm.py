"""The LM1B/OWT FMLM recipe at CPU size: PSD distillation of the model configs/tiny_flm.py trains.

launch/local.sh --config=configs/tiny_flm.py     # the teacher → runs/tiny_flm
launch/local.sh --config=configs/tiny_fmlm.py    # reads runs/tiny_flm → runs/tiny_fmlm
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path
import common  # noqa: E402
import tiny_flm  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = tiny_flm.get_config()  # same data, model width and optimizer as its teacher ...
    config.mode = "distill"  # FMLM
    config.model.two_time = True  # δ_{s,t}: adds sigma_map_prime(τ_t)
    # Global batch 64: 32 diagonal / 1 boundary / 31 off-diagonal rows.
    config.distill = common.psd_distill(teacher_path="runs/tiny_flm")  # launch/local.sh's default workdir
    config.train.update(num_steps=400, b2=0.95)  # ... except β₂ = 0.95, as the published script
    config.sample.update(steps=(1, 2, 4, 8), gamma=0.8)
    return config


def sweep() -> list[dict]:
    """The three distillation objectives of SPEC §5."""
    return common.grid(**{"distill.method": ["psd", "lsd", "esd"]})
