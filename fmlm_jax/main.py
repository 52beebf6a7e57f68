"""Entry point: python -m fmlm_jax.main --config=configs/NAME.py --workdir=DIR [--config.x=y]

`config.mode` picks FLM training ('train') or FMLM distillation ('distill'; the teacher
is `distill.teacher_path`). Re-running with the same workdir resumes.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from fmlm_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "A get_config() file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics.jsonl go here.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("pass --config=configs/NAME.py and --workdir=DIR")
    logging.set_verbosity(logging.WARNING)  # progress is printed; library INFO logs are noise
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
