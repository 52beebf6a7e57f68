"""`python -m fmlm_jax.evaluate sample|evaluate ...`: the evaluation CLI (fmlm_jax.evaluation.cli)."""

import sys

from fmlm_jax.evaluation.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
