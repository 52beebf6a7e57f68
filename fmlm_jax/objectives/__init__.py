"""Training objectives: FLM cross-entropy (stage 1) and FMLM distillation (stage 2)."""
