"""FMLM distillation of a two-time denoiser δ_{s,t} (SPEC §5).

Methods: PSD (semigroup; the released models), LSD (Lagrangian), ESD (Eulerian), each with
a pretrained FLM teacher or without one (self-distillation).

  rows.py     the row sampler: [diagonal | boundary | off-diagonal] over the global batch
  targets.py  the targets of each method for any log-denoiser, sparsemax / entmax
  loss.py     the loss: noisy inputs, the networks, one term per method behind a table
"""

from fmlm_jax.objectives.distill.loss import (
    METHODS,
    distill_loss,
    distill_loss_at,
    distill_terms_at,
    init_student,
    loss_terms,
    noise_width,
    projected_noise_enabled,
    teacher_config,
)
from fmlm_jax.objectives.distill.rows import check_accumulation, draw_plan, split_rows

__all__ = ["METHODS", "check_accumulation", "distill_loss", "distill_loss_at", "distill_terms_at",
           "draw_plan", "init_student", "loss_terms", "noise_width", "projected_noise_enabled",
           "split_rows", "teacher_config"]
