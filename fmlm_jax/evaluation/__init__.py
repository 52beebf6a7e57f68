"""Evaluation: generative perplexity, entropy, the sample/evaluate run, plots, the CLI (SPEC §8).

  gen_ppl.py        gen_ppl(texts, evaluator=..., backend=None|'torch'|'jax'); unigram_entropy(ids)
  jax_evaluator.py  the JAX backend: a GPT-2 evaluator run by fmlm_jax.textmodels, jit, sharded
  run.py            samples per step count, scoring, results.json, the table
  plots.py          gen-PPL and entropy against steps
  cli.py            python -m fmlm_jax.evaluate sample|evaluate
"""
