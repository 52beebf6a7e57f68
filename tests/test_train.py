"""fmlm_jax.train: the recipe (AdamW, clip, warm-up, EMA) against a hand implementation, the step
and gradient accumulation, learning, and the loop (validation, samples, TensorBoard, resume,
distillation, projected noise, prepared data, NaN stop, SIGTERM, refusals). The loop on 8
devices and 2 processes: tests/test_sharding.py.

Loop behaviours read the session's shared tiny run (conftest.tiny_run) where they can, and
otherwise use a one-block model, so each costs one small compile.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    ROOT,
    quiet,
    randomize,
    run_config,
    synthetic_model,
    tiny_model_config,
)

from fmlm_jax import checkpoints, model, objectives, sampling, sharding, train
from fmlm_jax.data import loader, prepare, shakespeare, synthetic, tokenizers

# ----------------------------------------------------------------------------- the recipe


def test_ema_decay_follows_the_warm_up_formula():
    n = np.array([1, 2, 10, 100, 10**6])
    expected = np.minimum(0.999, (1 + n) / (10 + n))
    np.testing.assert_allclose(np.asarray(train.ema_decay(jnp.asarray(n), 0.999)), expected, rtol=1e-6)


def test_learning_rate_warms_up_linearly_then_stays_constant_or_decays():
    t = run_config().train
    t.update(lr=1e-2, warmup_steps=4)
    lr = train.learning_rate(t)
    np.testing.assert_allclose([float(lr(s)) for s in range(7)],
                               [0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2], rtol=1e-6)
    t.update(lr=1e-3, warmup_steps=10, num_steps=110, schedule="cosine", final_lr_fraction=0.1)
    lr = train.learning_rate(t)
    assert float(lr(5)) == pytest.approx(0.5e-3) and float(lr(10)) == pytest.approx(1e-3)
    for step in (35, 60, 85, 110):  # cosine from lr to 0.1·lr over steps 10..110
        progress = (step - 10) / 100
        assert float(lr(step)) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + np.cos(np.pi * progress)), rel=1e-5)


def numpy_recipe_step(params, grads, m, v, ema, step, t):
    """SPEC §4 by hand, float64: global-norm clip, AdamW (bias-corrected, decoupled weight
    decay) at the warmed-up lr of this step, then the EMA with decay min(max, (1 + n)/(10 + n))."""
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    scale = min(1.0, t.grad_clip / norm)
    lr = t.lr * min(step, t.warmup_steps) / t.warmup_steps
    n = step + 1
    decay = min(t.ema_decay, (1 + n) / (10 + n))
    new = ([], [], [], [])
    for p, g, mi, vi, e in zip(params, grads, m, v, ema, strict=True):
        g = g.astype(np.float64) * scale
        mi = t.b1 * mi + (1 - t.b1) * g
        vi = t.b2 * vi + (1 - t.b2) * g**2
        m_hat, v_hat = mi / (1 - t.b1**n), vi / (1 - t.b2**n)
        p = p - lr * (m_hat / (np.sqrt(v_hat) + t.eps) + t.weight_decay * p)
        for out, value in zip(new, (p, mi, vi, decay * e + (1 - decay) * p), strict=True):
            out.append(value)
    return new, norm


def test_train_step_is_a_hand_adamw_with_clip_warm_up_and_ema(monkeypatch):
    # The step's whole update (clip → AdamW → EMA) for given gradients, against NumPy, with
    # β₁ ≠ β₂, a large eps, weight decay, a clip that acts and the warm-up's first steps.
    config = run_config(model=tiny_model_config(n_blocks=1),
                        train=dict(lr=2e-2, warmup_steps=4, b1=0.8, b2=0.95, eps=1e-3, weight_decay=0.1,
                                   grad_clip=0.5, ema_decay=0.99))
    t = config.train
    state = train.create_train_state(config, jax.random.key(0))
    leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(state.params)]
    m, v, ema = [np.zeros_like(x) for x in leaves], [np.zeros_like(x) for x in leaves], list(leaves)
    # The step's gradient is replaced by the one the batch carries: one compile for all steps.
    monkeypatch.setattr(train, "gradients",
                        lambda params, batch, *_: (batch["grads"], {"loss": jnp.zeros(())}))
    step_fn = jax.jit(lambda state, batch: train.train_step(state, batch, jax.random.key(1), config))
    rng = np.random.default_rng(0)
    for step in range(3):  # lr 0, lr/4, lr/2 of the warm-up
        grads = [rng.normal(size=x.shape).astype(np.float32) for x in leaves]
        batch = {"grads": jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.params), grads)}
        state, metrics = step_fn(state, batch)
        (leaves, m, v, ema), norm = numpy_recipe_step(leaves, grads, m, v, ema, step, t)
        assert norm > t.grad_clip and float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
        for want, got in zip(leaves, jax.tree_util.tree_leaves(state.params), strict=True):
            np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-7)
        for want, got in zip(ema, jax.tree_util.tree_leaves(state.ema_params), strict=True):
            np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-7)
    assert int(state.step) == 3


# ----------------------------------------------------------------------------- accumulation


def _accumulation_config(mode):
    return run_config(mode, model=tiny_model_config(two_time=mode == "fmlm", n_blocks=1),
                      data=dict(batch_size=64), distill=dict(boundary_prob=32.0))


@pytest.mark.parametrize("mode", [pytest.param("flm", marks=pytest.mark.slow), "fmlm"])
def test_accumulated_gradient_equals_the_full_batch_gradient(mode):
    # Times, row kinds and noise are drawn per row over the global batch, and dropout is off:
    # 4 micro-batches must give the one-batch gradient, noise included.
    n_rows = 64
    config = _accumulation_config(mode)
    teacher = None
    params = randomize(model.init_params(config.model, jax.random.key(0)), jax.random.key(1))
    if mode == "fmlm":
        teacher_cfg = objectives.distill.teacher_config(config.model)
        teacher = randomize(model.init_params(teacher_cfg, jax.random.key(5)), jax.random.key(6))
    tokens = jax.random.randint(jax.random.key(2), (n_rows, 5), 0, config.model.vocab_size)
    batch = {"tokens": tokens}

    def run(accumulation):
        config.train.grad_accum_steps = accumulation
        return jax.jit(lambda p: train.gradients(p, batch, jax.random.key(3), config, teacher, p))(params)

    (full, full_metrics), (acc, acc_metrics) = run(1), run(4)
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), full, acc)
    scale = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: float(jnp.max(jnp.abs(a))), full)))
    assert max(jax.tree_util.tree_leaves(diffs)) < 1e-5 * scale
    assert float(acc_metrics["loss"]) == pytest.approx(float(full_metrics["loss"]), rel=1e-6)
    if mode == "fmlm":  # 64 rows: 32 diagonal, 1 boundary, 31 off-diagonal, whatever the accumulation
        counts = [round(float(acc_metrics[f"rows_{kind}"]) * n_rows)
                  for kind in ("diagonal", "boundary", "offdiagonal")]
        assert counts == [32, 1, 31]
    # strided micro-batches: micro-batch i holds rows i, i+2, ... (a device's rows stay local)
    micro = train._micro_batches(jnp.arange(8), 2)
    np.testing.assert_array_equal(np.asarray(micro), [[0, 2, 4, 6], [1, 3, 5, 7]])


@pytest.mark.parametrize("n_rows", [128, 512])
@pytest.mark.parametrize("accumulation", [1, 2, 4, 16])
def test_the_row_split_is_global_under_accumulation(n_rows, accumulation):
    # SPEC §5: the split is over the global batch. OWT (N = 128) with 4 micro-batches gets
    # 64 / 2 / 62 rows per update; a split per micro-batch of 32 rows would give 64 / 0 / 64.
    config = _accumulation_config("fmlm")
    plan = objectives.distill.draw_plan(jax.random.key(0), n_rows, config)
    micro = jax.tree_util.tree_map(lambda x: np.asarray(train._micro_batches(x, accumulation)),
                                   {k: plan[k] for k in ("tau_s", "tau_t")})
    n_diag = objectives.distill.rows.diagonal_rows(n_rows // accumulation, config)
    totals = np.zeros(3, int)
    for tau_s, tau_t in zip(micro["tau_s"], micro["tau_t"], strict=True):
        assert np.all(tau_s[:n_diag] == tau_t[:n_diag])  # the leading rows the loss treats as diagonal
        boundary = int(np.sum((tau_s[n_diag:] == 0.0) & (tau_t[n_diag:] == 1.0)))
        totals += [n_diag, boundary, len(tau_s) - n_diag - boundary]
    assert tuple(totals) == objectives.distill.split_rows(n_rows, 0.5, 32.0)
    assert tuple(totals) == {128: (64, 2, 62), 512: (256, 8, 248)}[n_rows]


# ----------------------------------------------------------------------------- learning


def train_on_phrases(config) -> dict:
    """Trains a tiny FLM on the synthetic phrases in memory and samples with the EMA weights."""
    tokenizer = synthetic.WordTokenizer()
    init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 3)
    state = train.create_train_state(config, init_rng)
    step_fn = train.jit_train_step(config)
    data = synthetic.batches(config.data.batch_size, config.data.seq_len, config.seed, tokenizer)
    losses = []
    for step in range(1, config.train.num_steps + 1):
        state, metrics = step_fn(state, next(data), train_rng)
        if step % config.train.log_every == 0:
            losses.append(float(metrics["loss"]))
    z0 = sampling.initial_noise(sample_rng, 64, config.data.seq_len, config.model)
    ids = np.asarray(sampling.generate(state.ema_params, config.model, z0, 16))
    return {"losses": losses, "valid_bigrams": synthetic.valid_bigram_fraction(ids, tokenizer),
            "params": state.ema_params}


@pytest.fixture(scope="module")
def phrases_run():
    config = run_config(model=tiny_model_config(vocab_size=len(synthetic.WordTokenizer())),
                        data=dict(seq_len=12, batch_size=32),
                        train=dict(num_steps=300, lr=3e-3, warmup_steps=20, log_every=50))
    return config, train_on_phrases(config)


def test_flm_learns_the_synthetic_phrases(phrases_run):
    config, result = phrases_run
    # The zero-initialised model starts at exactly log K (uniform prediction).
    losses = result["losses"]
    assert losses[-1] < 0.5 * np.log(config.model.vocab_size) and losses[-1] < losses[0]
    # Uniformly random tokens form a corpus bigram ~3% of the time.
    vocab = len(synthetic.WordTokenizer())
    chance = len(synthetic.corpus_bigrams(synthetic.WordTokenizer())) / vocab**2
    assert chance < 0.05 and result["valid_bigrams"] > 5 * chance


def test_projected_sampler_agrees_in_distribution_with_dense(phrases_run):
    config, result = phrases_run
    tokenizer = synthetic.WordTokenizer()
    shape = (512, config.data.seq_len)
    z0 = sampling.initial_noise(jax.random.key(5), *shape, config.model)
    eps0 = sampling.initial_noise(jax.random.key(6), *shape, config.model, projected=True)
    dense = sampling.generate(result["params"], config.model, z0, 16)
    projected = sampling.generate(result["params"], config.model, eps0, 16, projected=True)
    a = synthetic.valid_bigram_fraction(np.asarray(dense), tokenizer)
    b = synthetic.valid_bigram_fraction(np.asarray(projected), tokenizer)
    assert a > 0.15 and abs(a - b) < 0.06, (a, b)
    vocab = config.model.vocab_size
    pa = np.bincount(np.asarray(dense).ravel(), minlength=vocab) / dense.size
    pb = np.bincount(np.asarray(projected).ravel(), minlength=vocab) / projected.size
    assert 0.5 * np.abs(pa - pb).sum() < 0.08  # unigram frequencies agree (total variation)


# ----------------------------------------------------------------------------- the loop


def test_loop_validates_samples_and_writes_tensorboard(tiny_run):
    flm_config, _ = tiny_run["configs"]
    workdir, rows = tiny_run["flm"], tiny_run["flm_rows"]
    assert [r["step"] for r in rows] == [4, 8]
    for row in rows:
        assert np.isfinite(row["val/loss"]) and np.isfinite(row["val/nll"])
        assert row["train/lr"] > 0 and row["perf/tokens_per_s"] > 0
    # validation is deterministic: recomputing it from the saved EMA weights gives the same
    params, _, _ = checkpoints.load(workdir, weights="ema")
    mesh = sharding.make_mesh()
    eval_fn = jax.jit(lambda p, b, r: train.eval_step(p, b, r, flm_config))
    eval_rng = jax.random.split(jax.random.fold_in(jax.random.key(flm_config.seed), 1))[0]
    again = train.validation_metrics(eval_fn, jax.tree_util.tree_map(jnp.asarray, params), flm_config,
                                     eval_rng, sharding.batch_sharding(mesh))
    assert again["val/loss"] == pytest.approx(rows[-1]["val/loss"], rel=1e-6)
    # samples: text made of the corpus's words, one line per step that sampled
    samples = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
    assert [s["step"] for s in samples] == [8] and len(samples[0]["texts"]) == flm_config.train.sample_num
    vocab = set(synthetic.WordTokenizer().vocab)
    for text in samples[0]["texts"]:
        assert len(text.split()) == flm_config.data.seq_len and set(text.split()) <= vocab
    # TensorBoard event file with the train, validation and perf scalars
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"train/loss", "val/loss", "perf/steps_per_s", "steps_per_sec"} <= tags, tags
    losses = [float(e.tensor_proto.float_val[0] if e.tensor_proto.float_val else
                    np.frombuffer(e.tensor_proto.tensor_content, np.float32)[0])
              for e in acc.Tensors("train/loss")]
    assert losses == pytest.approx([r["train/loss"] for r in rows], rel=1e-6)


def test_distillation_loop_from_a_teacher_workdir_validates_and_samples(tiny_run):
    _, fmlm_config = tiny_run["configs"]
    rows = tiny_run["fmlm_rows"]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["train/loss"]) for r in rows)
    assert {"train/diag_loss", "train/offdiag_loss", "val/loss", "val/diag_loss"} <= set(rows[0])
    # 8 rows, f = 0.5, P = 4: 4 diagonal, 1 boundary, 3 off-diagonal rows in every update
    assert round(rows[0]["train/rows_boundary"] * 8) == 1
    meta, _ = checkpoints.read_meta(tiny_run["fmlm"])
    assert meta["teacher"]["path"] == tiny_run["flm"]
    assert meta["teacher"]["model_fingerprint"] == checkpoints.model_fingerprint(
        objectives.distill.teacher_config(fmlm_config.model))
    samples = [json.loads(line) for line in open(os.path.join(tiny_run["fmlm"], "samples.jsonl"))]
    assert [s["step"] for s in samples] == [4]  # one-step FMLM samples, γ = 0


def test_the_student_starts_as_its_teacher(tiny_run):
    # In a distillation run (not just `init_student`): the state the loop starts from computes
    # the teacher's EMA denoiser at every (τ_s, τ_t).
    _, fmlm_config = tiny_run["configs"]
    teacher, teacher_cfg, _ = checkpoints.load(tiny_run["flm"], "ema")
    state = train.init_train_state(
        fmlm_config, sharding.make_mesh(), jax.random.key(0),
        params=objectives.distill.init_student(teacher, fmlm_config.model, jax.random.key(1)))
    z = jax.random.normal(jax.random.key(2), (3, 8, fmlm_config.model.vocab_size))
    tau_s, tau_t = jnp.array([0.0, 0.3, 0.9]), jnp.array([1.0, 0.6, 0.95])
    student = model.log_denoiser(state.params, fmlm_config.model)(z, tau_s, tau_t)
    reference = model.log_denoiser(teacher, teacher_cfg)(z, tau_s)
    np.testing.assert_allclose(student, reference, atol=1e-5)
    assert float(jnp.abs(reference - reference.mean(-1, keepdims=True)).max()) > 1e-3  # not uniform


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    def config(num_steps):
        return run_config(model=synthetic_model(n_blocks=1, dropout=0.1),  # dropout: the rng must follow
                          train=dict(num_steps=num_steps, log_every=1, save_every=5, warmup_steps=3))

    full = train.train_and_evaluate(config(9), str(tmp_path / "a"), log=quiet)
    first = train.train_and_evaluate(config(5), str(tmp_path / "b"), log=quiet)
    messages = []
    second = train.train_and_evaluate(config(9), str(tmp_path / "b"), log=messages.append)
    assert messages[0] == f"resumed from {tmp_path / 'b'} at step 5"

    def losses(rows):
        return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in rows]

    assert losses(first + second) == losses(full)  # bitwise: the floats compare equal
    logged = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in logged] == list(range(1, 10))


@pytest.fixture(scope="module")
def prepared_text(tmp_path_factory):
    """A prepared-data directory of the synthetic phrases with a 300-token BPE of its own."""
    root = tmp_path_factory.mktemp("prepared")
    docs = [" ".join(np.random.default_rng(i).permutation(synthetic.PHRASES)) for i in range(60)]
    tok = shakespeare.train_tokenizer(docs, 300)
    tok.save_pretrained(str(root / "tok"))
    eos = tok.eos_token_id
    for split, texts in (("train", docs[:50]), ("validation", docs[50:])):
        blocks = prepare.wrap(tokenizers.encode_batch(tok, texts), 8, bos=eos, eos=eos, separator=eos)
        prepare.write_blocks(blocks, str(root / "data" / split), 8, len(tok),
                             {"tokenizer": str(root / "tok")})
    return str(root / "data"), len(tok)


def test_prepared_data_and_projected_noise_end_to_end(tmp_path, prepared_text):
    # data.source='prepared' through the loop, with the projected path (SPEC §10) in training,
    # validation and periodic samples, decoded by the tokenizer the data names.
    data_dir, vocab = prepared_text
    config = run_config(model=tiny_model_config(vocab_size=vocab, n_blocks=1),
                        data=dict(source="prepared", dir=data_dir, batch_size=8, seq_len=8),
                        flm=dict(projected_noise=True),
                        train=dict(num_steps=4, eval_every=4, eval_batches=1, sample_every=4, sample_num=2,
                                   sample_steps=2))
    rows = train.train_and_evaluate(config, str(tmp_path), log=quiet)
    assert np.isfinite(rows[-1]["val/loss"]) and rows[-1]["train/loss"] < np.log(vocab) + 0.1
    texts = json.loads(open(tmp_path / "samples.jsonl").read())["texts"]
    tokenizer = loader.run_tokenizer(config)
    assert len(texts) == 2
    assert all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= 1 for text in texts)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    # Bad data: the 3rd batch carries a NaN in its loss mask, so step 3's loss and gradient
    # are NaN. The loop must stop there, before saving, leaving step 2 as the latest.
    real_iterator = loader.make_iterator

    class Poisoned:  # the real iterator (and its checkpointable state), a NaN in batch 3
        def __init__(self, config, split="train"):
            self.inner, self.count = real_iterator(config, split), 0

        def __next__(self):
            batch, self.count = next(self.inner), self.count + 1
            mask = np.ones(batch["tokens"].shape, np.float32)
            mask[0, 0] = np.nan if self.count == 3 else 1.0
            return {**batch, "mask": mask}

        def get_state(self):  # grain's handler takes bytes from a non-grain iterator
            return json.dumps(self.inner.get_state()).encode()

        def set_state(self, state):
            self.inner.set_state(json.loads(state))

    monkeypatch.setattr(loader, "make_iterator", Poisoned)
    config = run_config(model=synthetic_model(n_blocks=1), train=dict(num_steps=6, log_every=1, save_every=1))
    with pytest.raises(FloatingPointError,
                       match="non-finite metrics at step 3: .*last good checkpoint .* is step 2"):
        train.train_and_evaluate(config, str(tmp_path), log=quiet)
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in logged] == [1, 2]
    assert checkpoints.open_manager(tmp_path, read_only=True).latest_step() == 2


def test_bad_input_is_refused_before_anything_is_created(tmp_path, tiny_run):
    config = run_config(data=dict(source="prepared", dir=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="fmlm_jax.data.prepare"):
        train.train_and_evaluate(config, str(tmp_path / "a"), log=quiet)
    config = run_config()
    config.train.grad_accum_steps = 3
    with pytest.raises(ValueError, match="grad_accum_steps 3 must divide data.batch_size 8"):
        train.train_and_evaluate(config, str(tmp_path / "b"), log=quiet)
    assert not (tmp_path / "b").exists()  # a refusal leaves no workdir behind
    config = run_config("fmlm", distill=dict(teacher_path=""))
    with pytest.raises(ValueError, match="needs distill.teacher_path"):
        train.train_and_evaluate(config, str(tmp_path / "c"), log=quiet)
    _, fmlm_config = tiny_run["configs"]
    with pytest.raises(ValueError, match="holds a mode='flm' run, but this config has mode='fmlm'"):
        train.train_and_evaluate(fmlm_config, tiny_run["flm"], log=quiet)


@pytest.mark.slow  # a CLI subprocess trained, stopped and resumed (~35 s); CI runs it in its slow stage
def test_sigterm_saves_the_current_step_and_the_run_resumes(tmp_path):
    cmd = [sys.executable, "-u", "-m", "fmlm_jax.main", "--config=configs/tiny_flm.py",
           f"--workdir={tmp_path}", "--config.model.n_blocks=1", "--config.data.batch_size=8",
           "--config.train.eval_every=0", "--config.train.sample_every=0",
           "--config.train.num_steps=100000", "--config.train.log_every=1",
           "--config.train.save_every=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until training runs, then ask it to stop
        if line.startswith("step 3/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    saved = int(out.split("preempted: saved step ")[1].split()[0])
    assert saved >= 3
    assert checkpoints.open_manager(tmp_path, read_only=True).latest_step() == saved
    resume = cmd[:-3] + [f"--config.train.num_steps={saved + 2}", "--config.train.log_every=1"]
    resumed = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path} at step {saved}" in resumed.stdout
    assert f"step {saved + 2}/{saved + 2}: loss" in resumed.stdout
