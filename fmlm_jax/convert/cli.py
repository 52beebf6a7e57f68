"""`python -m fmlm_jax.convert torch-to-orbax|orbax-to-torch`: reference checkpoints ↔ Orbax (SPEC §7).

    python -m fmlm_jax.convert torch-to-orbax --src=lm1b_fmlm.ckpt --out=ckpt/lm1b_fmlm
    python -m fmlm_jax.convert orbax-to-torch --src=ckpt/lm1b_fmlm --out=lm1b_fmlm.safetensors

torch → Orbax writes an export (`fmlm_jax.checkpoints.export_params`: raw and EMA weights,
the model config, the training recipe); Orbax → torch reads any checkpoint `checkpoints.load`
reads (an export, a training workdir) and writes a `.ckpt` or `.safetensors`. Nothing is
written when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fmlm_jax import atomic, checkpoints, errors
from fmlm_jax import model as model_lib
from fmlm_jax.convert import names, torch_io


def torch_to_orbax(src, out_dir, config=None, weights: str = "ema", n_heads: int | None = None,
                   expected_vocab_size: int | None = None, overwrite: bool = False) -> dict:
    """Converts a reference checkpoint to Orbax; returns the written `meta` plus a summary.

    weights='ema' (default): the checkpoint must have an EMA; raw and EMA are both stored.
    weights='raw': the raw weights only. A safetensors file holds one set, which
    `weights` names. Nothing is written if any check fails.
    """
    out = os.path.abspath(os.fspath(out_dir))
    torch_io.check_weights(weights)
    atomic.check_free(out, overwrite)
    atomic.check_writable(os.path.dirname(out))  # before the work, not after it
    ck = torch_io.read_torch_checkpoint(src)
    cfg = torch_io.checkpoint_config(ck, config, n_heads, expected_vocab_size)
    recipe = torch_io.training_recipe(ck.hyper_parameters, cfg.two_time, ck.source)
    sets = torch_io.weight_sets(ck, cfg, weights)
    step_dir = checkpoints.export_params(
        out, sets.get("raw"), sets.get("ema"), cfg, ck.global_step, source=ck.source,
        epoch=ck.epoch, ema_decay=ck.ema_decay, ema_num_updates=ck.ema_num_updates,
        overwrite=overwrite, recipe=recipe,
    )
    return {"step_dir": step_dir, "checkpoint": ck, "config": cfg, "weights": sorted(sets),
            "recipe": recipe}


def orbax_to_torch(src_dir, out, weights: str = "ema", overwrite: bool = False) -> dict:
    """Writes `out` (.ckpt or .safetensors) from a converted Orbax checkpoint.

    .ckpt: the raw weights as the state_dict, and with weights='ema' (default) the EMA
    as `ema.shadow_params`; weights='raw' omits the EMA. .safetensors: the one set named
    by `weights`.
    """
    out = os.path.abspath(os.fspath(out))
    torch_io.check_weights(weights)
    if not out.endswith((".ckpt", ".safetensors")):
        raise ValueError(f"output {out} must end with .ckpt (Lightning) or .safetensors (HF)")
    atomic.check_free(out, overwrite)
    atomic.check_writable(os.path.dirname(out))  # before the work, not after it
    if out.endswith(".safetensors"):
        loaded = checkpoints.load_checkpoint(src_dir, weights)
        torch_io.save_safetensors(out, loaded.params, loaded.model_config, weights, loaded.step, overwrite)
        return {"meta": loaded.meta, "weights": [weights], "out": out}
    meta, _ = checkpoints.read_meta(src_dir, warn=lambda _: None)  # load_checkpoint names damaged steps
    if meta.get("format") == checkpoints.EXPORT_FORMAT and "raw" not in meta["weights"]:
        raise ValueError(
            f"{src_dir} holds no raw weights (only {meta['weights']}), which a .ckpt's "
            "state_dict needs; write a .safetensors file instead"
        )
    raw = checkpoints.load_checkpoint(src_dir, "raw")
    meta, step, cfg = raw.meta, raw.step, raw.model_config
    step_dir = os.path.join(checkpoints.locate(src_dir)[0], str(step))  # the EMA of that same step
    ema = checkpoints.load(step_dir, "ema")[0] if weights == "ema" else None  # errors if absent
    ema_meta = meta.get("ema") or {}
    torch_io.save_torch_checkpoint(out, raw.params, ema, cfg, step, meta.get("epoch", 0),
                                   ema_meta.get("decay"), ema_meta.get("num_updates"), overwrite)
    return {"meta": meta, "weights": ["raw"] + (["ema"] if ema is not None else []), "out": out}


# ============================================================================ the CLI


def _parser() -> argparse.ArgumentParser:
    parser = errors.ArgumentParser(
        prog="python -m fmlm_jax.convert",
        description="Convert FLM/FMLM checkpoints between the reference PyTorch layout "
        "(Lightning .ckpt, HF .safetensors) and Orbax (SPEC §7).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t2o = sub.add_parser(
        "torch-to-orbax", help="a .ckpt / .safetensors file → an Orbax checkpoint directory",
        description="Reads a reference checkpoint, infers the model config from its tensors "
        "(vocab, width, cond dim, depth, two-time, loss weighting), and writes DIR/<step>/"
        "{params,meta} with raw and EMA weights.",
    )
    t2o.add_argument("--src", required=True, help="a Lightning .ckpt or HF .safetensors file")
    t2o.add_argument("--out", required=True, help="the Orbax directory to create")
    t2o.add_argument(
        "--weights", choices=checkpoints.WEIGHTS, default="ema",
        help="ema (default): store the raw weights and the EMA, which must exist; raw: "
        "store the raw weights only. A safetensors file holds one set: this names it.",
    )
    t2o.add_argument(
        "--n-heads", type=int, default=None,
        help="attention heads (not visible in weight shapes). The published checkpoints "
        "(lm1b_flm, lm1b_fmlm, owt_flm, owt_fmlm) are all DiT-small = 12 heads. Needed for "
        "safetensors; a .ckpt's rotary buffer gives it (and is checked against this).",
    )
    t2o.add_argument(
        "--size", choices=sorted(model_lib.MODEL_SIZES), default=None,
        help="check the tensors against a SPEC size (small = 768 wide, 12 blocks, 12 heads, "
        "cond 128) and take its head count",
    )
    t2o.add_argument(
        "--vocab-size", type=int, default=None,
        help="expected vocabulary size: 30522 (bert-base-uncased, LM1B) or 50258 "
        "(gpt2 + [PAD], OWT); a mismatch is an error",
    )
    t2o.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    t2o.add_argument("--verbose", action="store_true", help="print the traceback of a refusal")

    o2t = sub.add_parser(
        "orbax-to-torch", help="an Orbax checkpoint directory → a .ckpt or .safetensors file",
        description="Writes a .ckpt in the released layout (state_dict with backbone. keys and "
        "the rotary buffer, ema.shadow_params in reference order) or HF-style safetensors.",
    )
    o2t.add_argument("--src", required=True, help="an Orbax directory written by torch-to-orbax "
                     "or save_orbax (or one of its step directories)")
    o2t.add_argument("--out", required=True, help="Y.ckpt or Y.safetensors")
    o2t.add_argument(
        "--weights", choices=checkpoints.WEIGHTS, default="ema",
        help=".ckpt: ema (default) writes raw + EMA, raw omits the EMA; .safetensors: "
        "which set to write",
    )
    o2t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    o2t.add_argument("--verbose", action="store_true", help="print the traceback of a refusal")
    return parser


def _config_line(cfg) -> str:
    return (f"vocab {cfg.vocab_size}, width {cfg.hidden_size}, cond {cfg.cond_dim}, "
            f"{cfg.n_blocks} blocks, {cfg.n_heads} heads, mlp ratio {cfg.mlp_ratio}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "torch-to-orbax":
        atomic.check_free(os.path.abspath(args.out), args.overwrite)
        atomic.check_writable(os.path.dirname(os.path.abspath(args.out)))
        ck = torch_io.read_torch_checkpoint(args.src)
        config = None
        if args.size is not None:
            found = torch_io.inferred_fields(ck)
            config = model_lib.model_config(
                args.size, found["vocab_size"], two_time=found["two_time"],
                learnable_loss_weighting=found["learnable_loss_weighting"])
        result = torch_to_orbax(ck, args.out, config, args.weights, args.n_heads,
                                args.vocab_size, args.overwrite)
        cfg = result["config"]
        print(f"read {ck.source} ({ck.format}): {names.describe_layout(cfg)}, step {ck.global_step}"
              + ("" if ck.ema is None else f", EMA of {len(ck.ema)} tensors"))
        print(f"recipe: {torch_io.describe_recipe(result['recipe'])}")
        for note in ck.notes + ([f"dropped {len(ck.dropped)} non-backbone/teacher tensors"]
                                if ck.dropped else []):
            print(f"  note: {note}")
        heads = ("the rotary buffer" if ck.inv_freq is not None
                 else "--size" if args.size else "--n-heads")
        print(f"model: {_config_line(cfg)} (heads from {heads})")
        print(f"wrote {result['step_dir']} (params: {', '.join(result['weights'])}; meta)")
    else:
        result = orbax_to_torch(args.src, args.out, args.weights, args.overwrite)
        layout = names.describe_layout(result["meta"]["model_config"])
        print(f"read {args.src}: {layout}, step {result['meta']['step']}")
        print(f"wrote {result['out']} ({', '.join(result['weights'])} weights)")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """The entry point: `main` with one-line refusals (exit code 2; --verbose: traceback)."""
    return errors.run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())

