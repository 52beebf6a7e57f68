"""Evaluation: generative perplexity, entropy, the sample/evaluate run, plots, the CLI (SPEC §8).

  gen_ppl.py  gen_ppl(texts, evaluator=...) under a causal LM; unigram_entropy(ids)
  run.py      samples per step count, scoring, results.json, the table
  plots.py    gen-PPL and entropy against steps
  cli.py      python -m fmlm_jax.evaluate sample|evaluate
"""
