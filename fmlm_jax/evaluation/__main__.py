"""`python -m fmlm_jax.evaluation ...` = `python -m fmlm_jax.evaluate ...` (fmlm_jax.evaluation.cli)."""

import sys

from fmlm_jax.evaluation.cli import cli

sys.exit(cli())
