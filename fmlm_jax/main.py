"""Entry point: python -m fmlm_jax.main --config=configs/NAME.py[:VARIANT] --workdir=DIR [--config.x=y]

`config.mode` picks FLM training ('flm') or FMLM distillation ('fmlm'; the teacher is
`distill.teacher_path`). Re-running with the same workdir resumes. Refusals (a misspelt
override, a batch that does not split, a missing teacher) are one line and exit code 2;
--verbose shows the traceback.

Multi-host (SLURM, Cloud TPU pods, GKE): with FMLM_JAX_DISTRIBUTED=1 in the environment
(the launchers in launch/ set it), `jax.distributed.initialize()` runs first; it reads
the coordinator, process count and index from the cluster environment (SLURM, TPU
metadata) or from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fmlm_jax import config as fmlm_config
from fmlm_jax import errors, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "A get_config() file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics.jsonl go here.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of a refusal.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("pass --config=configs/NAME.py and --workdir=DIR")
    logging.set_verbosity(logging.WARNING)  # progress is printed; library INFO logs are noise
    with errors.refusals(_VERBOSE.value):
        config = fmlm_config.validate(_CONFIG.value)
        if os.environ.get("FMLM_JAX_DISTRIBUTED", "0") == "1":
            jax.distributed.initialize()
        print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} of "
              f"{jax.device_count()} {jax.devices()[0].platform} devices", flush=True)

        def log(message):  # progress from the first process only
            if jax.process_index() == 0:
                print(message, flush=True)

        train.train_and_evaluate(config, _WORKDIR.value, log=log)


if __name__ == "__main__":
    app.run(main, flags_parser=errors.parse_flags)
