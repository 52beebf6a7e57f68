"""Training objectives: FLM cross-entropy (stage 1, `flm`) and FMLM distillation (stage 2,
`distill`). Both have the same shape, which is all the train step knows:

    plan = draw_plan(rng, N, config)      # per-row times and noise keys of the global batch
    terms = loss_terms(params, batch, plan, dropout_rng, config, teacher_params, ema_params, train)
    metrics = finalize(terms)             # terms: {name: (sum, count)}; metric = sum / count
"""

from fmlm_jax.objectives import distill, flm
from fmlm_jax.objectives.flm import finalize

_BY_MODE = {"flm": flm, "fmlm": distill}  # config.mode → objective


def for_config(config):
    """The objective module (`flm` or `distill`) that `config.mode` selects."""
    mode = config.mode
    if mode not in _BY_MODE:
        raise ValueError(f"config.mode must be 'flm' (FLM training) or 'fmlm' (FMLM distillation), "
                         f"got {mode!r}")
    return _BY_MODE[mode]


__all__ = ["distill", "finalize", "flm", "for_config"]
