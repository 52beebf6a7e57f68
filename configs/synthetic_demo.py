"""The first main job: a tiny FLM on built-in synthetic phrases, on CPU in about a minute."""

import ml_collections

from fmlm_jax.data.synthetic import WordTokenizer
from fmlm_jax.model import model_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.mode = "train"  # FLM; 'distill' for FMLM (fmlm_jax.main)
    config.data = ml_collections.ConfigDict(dict(source="synthetic", seq_len=16, batch_size=64))
    config.model = model_config(
        "tiny", vocab_size=len(WordTokenizer()), hidden_size=64, cond_dim=32, n_blocks=2,
        n_heads=4, dropout=0.0,
    )
    config.flm = ml_collections.ConfigDict(dict(tau_min=0.0, tau_max=1.0))
    config.train = ml_collections.ConfigDict(
        dict(
            num_steps=800, lr=2e-3, schedule="constant", warmup_steps=50, b1=0.9, b2=0.999,
            eps=1e-8, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, grad_accum_steps=1,
            log_every=100, save_every=200, keep_last=3, keep_every=0,
            eval_every=0, eval_batches=4,  # 0: no validation (e.g. 200 to validate every 200 steps)
            sample_every=0, sample_num=4, sample_steps=16,  # 0: no periodic samples
        )
    )
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # all devices data-parallel
    config.sample = ml_collections.ConfigDict(dict(num_samples=256, steps=(1, 4, 16, 64)))
    return config
