"""The LM1B/OWT FLM recipe at CPU size: the same groups and keys, a narrow DiT, synthetic phrases.

    python -m fmlm_jax.main --config=configs/tiny_flm.py --workdir=runs/tiny_flm   # ~1 min on 2 CPU cores
    launch/local.sh --config=configs/tiny_flm.py                                   # the same, → runs/tiny_flm

On a prepared local-text source instead (any tokenizer; K must match it):

    python -m fmlm_jax.data.prepare --dataset=text --split=train --seq-len=64 --input=corpus/ \
        --tokenizer=gpt2 --out=data/mytext
    launch/local.sh --config=configs/tiny_flm.py --config.data.source=prepared \
        --config.data.dir=data/mytext --config.data.seq_len=64 --config.data.tokenizer=gpt2 \
        --config.model.vocab_size=50257

What differs from configs/lm1b_flm.py, and why: width/depth (CPU), dropout 0 and lr 2e-3 (a few
hundred steps on a tiny corpus), float32 compute (bf16 is emulated, hence slow, on CPU), steps.
"""

from fmlm_jax import config as fmlm_config
from fmlm_jax.data.synthetic import WordTokenizer


def get_config():
    config = fmlm_config.defaults("flm")
    config.data.update(
        source="synthetic",  # built-in phrases; 'prepared' reads `dir`
        seq_len=16,
        batch_size=64,  # GLOBAL batch
    )
    config.model.update(
        vocab_size=len(WordTokenizer()),
        hidden_size=64,
        cond_dim=32,
        n_blocks=2,
        n_heads=4,
        dropout=0.0,
        dtype="float32",
    )
    config.flm.update(tau_min=0.0, tau_max=1.0, projected_noise=False)
    config.train.update(
        num_steps=800,
        lr=2e-3,
        schedule="constant",
        warmup_steps=50,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,
        ema_decay=0.9999,  # with warm-up: min(0.9999, (1 + n)/(10 + n))
        grad_accum_steps=1,
        log_every=100,
        save_every=200,
        keep_last=3,
        keep_every=0,
        eval_every=200,
        eval_batches=4,
        sample_every=400,
        sample_num=4,
        sample_steps=16,
    )
    config.sample.update(num_samples=256, steps=(1, 4, 16, 64), batch_size=256)
    return config


def sweep() -> list[dict]:
    """Three seeds: a cheap sweep for trying the launchers."""
    return fmlm_config.grid(seed=[0, 1, 2])
