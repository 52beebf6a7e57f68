"""LM1B FLM (stage 1), the published run: DiT-small, L = 128, bert-base-uncased (SPEC §3, §4, §4.1).

    python -m fmlm_jax.data.prepare --dataset=lm1b --split=train --seq-len=128 --out=data/lm1b
    python -m fmlm_jax.data.prepare --dataset=lm1b --split=test  --seq-len=128 --out=data/lm1b
    python -m fmlm_jax.main --config=configs/lm1b_flm.py --workdir=runs/lm1b_flm [--config.x=y ...]

139,292,986 parameters. Where the reference scripts and the paper differ the reference value is
the default and the other one is named beside it.
"""

from fmlm_jax import config as fmlm_config


def get_config():
    config = fmlm_config.defaults("flm")
    config.data.update(
        source="prepared",
        dir="data/lm1b",  # fmlm_jax.data.prepare --dataset=lm1b (train and test splits)
        seq_len=128,  # L; wrapped blocks [CLS] + 126 ids + [CLS]
        batch_size=512,  # GLOBAL batch, split over all devices / processes
        valid_split="test",  # LM1B has no validation split: test serves as validation
        tokenizer="bert-base-uncased",  # K = 30522
    )
    config.model.update(
        fmlm_config.model_size("small"),  # d 768, 12 blocks, 12 heads, cond 128
        vocab_size=30522,
        dropout=0.1,
        dtype="bfloat16",  # bf16 matmuls, float32 params and residual stream (reference autocast)
    )
    config.flm.update(
        tau_min=0.0,  # τ ~ U[tau_min, tau_max], antithetic over the global batch
        tau_max=1.0,
        projected_noise=False,  # SPEC §10 [ours]: True never forms the (B, L, K) noise
    )
    config.train.update(
        num_steps=1_000_000,  # SPEC §4: 1M–1.5M; the reference distils the 1M-step checkpoint
        lr=3e-4,
        schedule="constant",  # after the linear warm-up
        warmup_steps=2500,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,  # global-norm clip
        ema_decay=0.9999,  # with warm-up: min(0.9999, (1 + n)/(10 + n))
        grad_accum_steps=1,  # >1 keeps the global batch and splits it into micro-batches
        log_every=100,
        save_every=5000,  # a requeued SLURM job loses at most this many steps
        keep_last=2,
        keep_every=100_000,  # permanent checkpoints (0: none)
        eval_every=5000,  # the reference's val_check_interval
        eval_batches=64,  # [ours] a fixed subset of the test split; the reference validates on all of it
        sample_every=5000,
        sample_num=4,  # sequences decoded to text at each periodic sampling
    )
    config.sample.update(
        num_samples=1024,  # [ours]; the reference draws num_sample_batches × eval batch × GPUs
        steps=(8, 16, 32, 64, 128, 256, 512, 1024),  # Euler steps of the paper's FLM table (SPEC §9)
        batch_size=128,
    )
    config.eval.update(evaluator="gpt2-large", batch_size=8)
    return config


def sweep() -> list[dict]:
    """Learning rate around the published 3e-4 (one job per point)."""
    return fmlm_config.grid(**{"train.lr": [1e-4, 3e-4, 6e-4]})
