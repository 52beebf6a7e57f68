"""OpenWebText FLM (stage 1), the published run: DiT-small, L = 1024, gpt2 + [PAD] (SPEC §3, §4, §4.1).

    python -m fmlm_jax.data.prepare --dataset=owt --split=train --seq-len=1024 --input=PATH --out=data/owt
    python -m fmlm_jax.data.prepare --dataset=owt --split=validation --seq-len=1024 --input=PATH \
        --out=data/owt
    python -m fmlm_jax.main --config=configs/owt_flm.py --workdir=runs/owt_flm [--config.x=y ...]

169,627,218 parameters. The dense noisy input is (B, 1024, 50258) floats: 206 MB per sequence
in float32, so the global batch of 512 needs many devices, `train.grad_accum_steps` or
`flm.projected_noise=True` (SPEC §10).
"""

from fmlm_jax import config as fmlm_config


def get_config():
    config = fmlm_config.defaults("flm")
    config.data.update(
        source="prepared",
        dir="data/owt",  # fmlm_jax.data.prepare --dataset=owt: train[:-100000] / train[-100000:]
        seq_len=1024,  # L; wrapped with <|endoftext|> (50256) as BOS = EOS = separator
        batch_size=512,  # GLOBAL batch
        valid_split="validation",
        tokenizer="gpt2",  # + one added [PAD]: K = 50258
    )
    config.model.update(fmlm_config.model_size("small"), vocab_size=50258, dropout=0.1, dtype="bfloat16")
    config.flm.update(tau_min=0.0, tau_max=1.0, projected_noise=False)
    config.train.update(
        num_steps=1_000_000,
        lr=3e-4,
        schedule="constant",
        warmup_steps=2500,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,
        ema_decay=0.9999,
        grad_accum_steps=1,
        log_every=100,
        save_every=5000,
        keep_last=2,
        keep_every=100_000,
        eval_every=5000,
        eval_batches=16,  # [ours] a fixed subset of the 100k-document validation split
        sample_every=5000,
        sample_num=2,
    )
    config.sample.update(
        num_samples=1024,  # [ours]
        steps=(8, 16, 32, 64, 128, 256, 512, 1024),  # SPEC §9
        batch_size=16,  # a (16, 1024, 50258) float32 state is 3.3 GB
    )
    config.eval.update(evaluator="gpt2-large", batch_size=8)
    return config


def sweep() -> list[dict]:
    """Learning rate around the published 3e-4 (one job per point)."""
    return fmlm_config.grid(**{"train.lr": [1e-4, 3e-4, 6e-4]})
