"""Pretrained Hugging Face text models in JAX (Flax Linen): evaluators and differentiable rewards.

  hf_weights.py  reading a checkpoint (config.json + safetensors / pytorch_model.bin, local or
                 from the hub) into flat float32 arrays; the name normalization; name tables
  gpt2.py        the GPT-2 family as a causal LM (logits), `load_gpt2`, `soft_embeds`
  bert.py        BertModel and BertForSequenceClassification, `load_bert`, `soft_embeds`

Both models take token ids or `inputs_embeds`; `soft_embeds(params, probs)` turns a
distribution over tokens (B, T, V) into those embeddings, so a reward can be differentiated
with respect to token probabilities. transformers is not needed (nor, for safetensors, torch).
"""

from fmlm_jax.textmodels import bert, gpt2, hf_weights
from fmlm_jax.textmodels.bert import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertOutput,
    load_bert,
)
from fmlm_jax.textmodels.gpt2 import GPT2Config, GPT2LMHeadModel, load_gpt2
from fmlm_jax.textmodels.hf_weights import load_checkpoint

__all__ = ["BertConfig", "BertForSequenceClassification", "BertModel", "BertOutput", "GPT2Config",
           "GPT2LMHeadModel", "bert", "gpt2", "hf_weights", "load_bert", "load_checkpoint", "load_gpt2"]
