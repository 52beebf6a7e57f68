"""`python -m fmlm_jax.convert ...` (see fmlm_jax.convert.cli)."""

import sys

from fmlm_jax.convert.cli import cli

sys.exit(cli())
