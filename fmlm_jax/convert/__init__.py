"""PyTorch reference checkpoints ↔ Flax parameters ↔ Orbax, driven by one name table (SPEC §7).

  names.py     the name table: reference tensor name ↔ Flax path, in the reference order
  torch_io.py  reading and writing `.ckpt` / `.safetensors`; the model config and training
               recipe a reference checkpoint carries
  cli.py       `python -m fmlm_jax.convert torch-to-orbax | orbax-to-torch` (Orbax through
               fmlm_jax.checkpoints)

The CLI module is not imported here: fmlm_jax.checkpoints reads reference files through
`torch_io`, and the CLI writes Orbax through fmlm_jax.checkpoints.
"""

from fmlm_jax.convert.names import (
    describe_layout,
    params_from_state_dict,
    reference_names,
    state_dict_from_params,
)
from fmlm_jax.convert.torch_io import (
    TorchCheckpoint,
    checkpoint_config,
    load_torch,
    params_from_torch,
    params_to_torch,
    read_torch_checkpoint,
    save_safetensors,
    save_torch_checkpoint,
    training_recipe,
)

__all__ = ["TorchCheckpoint", "checkpoint_config", "describe_layout", "load_torch", "params_from_state_dict",
           "params_from_torch", "params_to_torch", "read_torch_checkpoint", "reference_names",
           "save_safetensors", "save_torch_checkpoint", "state_dict_from_params", "training_recipe"]
