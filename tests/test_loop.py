"""The training system around the step: gradient accumulation, schedules, FLOP counts,
validation, periodic samples, TensorBoard metrics, NaN stop, SIGTERM, bad input, and the
loop on 8 devices and 2 processes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import randomize, tiny_model_config

from fmlm_jax import checkpoints, model, objectives, train
from fmlm_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import synthetic_demo  # noqa: E402


def loop_config(num_steps, **train_overrides):
    config = synthetic_demo.get_config()
    config.model.n_blocks = 1
    config.data.batch_size = 8
    config.train.update(num_steps=num_steps, log_every=2, save_every=2)
    config.train.update(train_overrides)
    return config


def quiet(*_):
    pass


# ----------------------------------------------------------------------------- the step


def _accumulation_config(mode, n_rows):
    config = ml_collections.ConfigDict()
    config.mode = mode
    config.model = tiny_model_config(two_time=mode == "fmlm", n_blocks=1)
    config.flm = dict(tau_min=0.0, tau_max=1.0, projected_noise=False)
    config.train = dict(grad_accum_steps=1)
    config.distill = dict(method="psd", use_teacher=True, diagonal_fraction=0.5, boundary_prob=32.0,
                          offdiag_sampling="uniform_diff", use_mse_loss_psd=False,
                          rescale_offdiag_loss_psd=False, use_ema_for_psd_target=False,
                          use_teacher_for_D_t_lsd=False, entmax_temp_lsd=2.0)
    return config


@pytest.mark.parametrize("mode", ["flm", "fmlm"])
def test_accumulated_gradient_equals_the_full_batch_gradient(mode):
    # Times, row kinds and noise are drawn per row over the global batch, and dropout is off:
    # 4 micro-batches must give the one-batch gradient, noise included.
    n_rows = 64
    config = _accumulation_config(mode, n_rows)
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
    config = _accumulation_config("fmlm", n_rows)
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


def test_cosine_schedule_warms_up_then_decays_to_the_final_fraction():
    config = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10, num_steps=110, schedule="cosine",
                                            final_lr_fraction=0.1))
    lr = train.learning_rate(config)
    assert float(lr(5)) == pytest.approx(0.5e-3)
    assert float(lr(10)) == pytest.approx(1e-3)
    for step in (35, 60, 85, 110):  # cosine from lr to 0.1·lr over steps 10..110
        progress = (step - 10) / 100
        expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * progress))
        assert float(lr(step)) == pytest.approx(expected, rel=1e-5)
    config.schedule = "linear"
    with pytest.raises(ValueError, match="'constant' or 'cosine'"):
        train.learning_rate(config)


def test_flop_counts_match_xla_for_forward_and_gradient():
    # The analytic model FLOPs (used for MFU) against XLA's own count of the compiled forward
    # pass and of the gradient, at a size where matmuls dominate (elementwise work ~2-5%).
    cfg = model.model_config("tiny", 2048, hidden_size=128, cond_dim=32, n_blocks=2, n_heads=4,
                             dropout=0.0)
    batch, length = 2, 64
    params = model.param_shapes(cfg)
    z = jax.ShapeDtypeStruct((batch, length, cfg.vocab_size), jnp.float32)
    tau = jax.ShapeDtypeStruct((batch,), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def forward(p, z, t):
        return model.DiT(cfg).apply({"params": p}, z, t)

    def loss(p, z, t, tokens):
        log_p = jax.nn.log_softmax(forward(p, z, t))
        return -jnp.take_along_axis(log_p, tokens[..., None], -1).mean()

    def xla_flops(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    analytic_forward = sum(train.forward_flops_per_token(cfg, length).values()) * batch * length
    assert xla_flops(forward, params, z, tau) == pytest.approx(analytic_forward, rel=0.1)
    config = ml_collections.ConfigDict(dict(model=cfg, data=dict(seq_len=length), flm=dict()))
    analytic_step = train.flm_flops_per_token(config) * batch * length
    assert xla_flops(jax.grad(loss), params, z, tau, tokens) == pytest.approx(analytic_step, rel=0.1)


# ----------------------------------------------------------------------------- the loop


def test_loop_validates_samples_and_writes_tensorboard(tmp_path):
    config = loop_config(4, eval_every=2, eval_batches=2, sample_every=4, sample_num=3, sample_steps=4)
    rows = train.train_and_evaluate(config, str(tmp_path), log=quiet)
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert np.isfinite(row["val/loss"]) and np.isfinite(row["val/nll"])
        assert row["train/lr"] > 0 and row["perf/tokens_per_s"] > 0
    # validation is deterministic: recomputing it from the saved EMA weights gives the same
    params, _ = checkpoints.load_weights(str(tmp_path), weights="ema")
    from fmlm_jax import sharding

    mesh = sharding.make_mesh()
    eval_fn = jax.jit(lambda p, b, r: train.eval_step(p, b, r, config))
    eval_rng = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))[0]
    again = train.evaluate(eval_fn, jax.tree_util.tree_map(jnp.asarray, params), config, eval_rng,
                           sharding.batch_sharding(mesh))
    assert again["val/loss"] == pytest.approx(rows[-1]["val/loss"], rel=1e-6)
    # samples: text made of the corpus's words, one line per step that sampled
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert [s["step"] for s in samples] == [4] and len(samples[0]["texts"]) == 3
    vocab = set(synthetic.WordTokenizer().vocab)
    for text in samples[0]["texts"]:
        assert len(text.split()) == config.data.seq_len and set(text.split()) <= vocab
    # TensorBoard event file with the train, validation and perf scalars
    from tensorboard.backend.event_processing import event_accumulator

    events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    assert events
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"train/loss", "val/loss", "perf/steps_per_s", "steps_per_sec"} <= tags, tags
    losses = [float(tf_event.tensor_proto.float_val[0] if tf_event.tensor_proto.float_val else
                    np.frombuffer(tf_event.tensor_proto.tensor_content, np.float32)[0])
              for tf_event in acc.Tensors("train/loss")]
    assert losses == pytest.approx([r["train/loss"] for r in rows], rel=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    # Bad data: the 3rd batch carries a NaN in its loss mask, so step 3's loss and gradient
    # are NaN. The loop must stop there, before saving, leaving step 2 as the latest.
    real_iterator = train.make_data_iterator

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

    monkeypatch.setattr(train, "make_data_iterator", Poisoned)
    config = loop_config(6, log_every=1, save_every=1)
    with pytest.raises(FloatingPointError, match="non-finite metrics at step 3: .*last good checkpoint .* "
                                                 "is step 2"):
        train.train_and_evaluate(config, str(tmp_path), log=quiet)
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in logged] == [1, 2]
    assert checkpoints.open_manager(tmp_path, read_only=True).latest_step() == 2


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    config = loop_config(2)
    config.data.source = "prepared"
    config.data.dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="fmlm_jax.data.prepare"):
        train.train_and_evaluate(config, str(tmp_path / "a"), log=quiet)
    config = loop_config(2, grad_accum_steps=3)
    with pytest.raises(ValueError, match="grad_accum_steps 3 .* divide data.batch_size 8"):
        train.train_and_evaluate(config, str(tmp_path / "b"), log=quiet)
    train.train_and_evaluate(loop_config(2), str(tmp_path / "c"), log=quiet)
    config = loop_config(4)
    config.mode = "distill"
    with pytest.raises(ValueError, match=r"lacks the section\(s\) \['distill'\]"):
        train.train_and_evaluate(config, str(tmp_path / "d"), log=quiet)
    import synthetic_distill

    config = synthetic_distill.get_config()
    with pytest.raises(ValueError, match="holds a mode='train' run"):
        train.train_and_evaluate(config, str(tmp_path / "c"), log=quiet)


def test_sigterm_saves_the_current_step_and_the_run_resumes(tmp_path):
    cmd = [sys.executable, "-u", "-m", "fmlm_jax.main", "--config=configs/synthetic_demo.py",
           f"--workdir={tmp_path}", "--config.model.n_blocks=1", "--config.data.batch_size=8",
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


# ----------------------------------------------------------------------------- many devices

EIGHT_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.path.join(sys.argv[1], "configs"))
    import jax, synthetic_demo
    from fmlm_jax import train

    def run(data, fsdp, accum, workdir):
        config = synthetic_demo.get_config()
        config.model.n_blocks = 1
        config.model.dropout = 0.1
        config.data.batch_size = 16
        config.mesh = dict(data=data, fsdp=fsdp)
        # no warm-up and a large lr: the zero-initialised output layer moves at once, so the
        # losses after step 1 depend on every gradient (at init every loss is log K)
        config.train.update(num_steps=4, log_every=1, save_every=4, grad_accum_steps=accum,
                            warmup_steps=1, lr=1e-2)
        rows = train.train_and_evaluate(config, workdir, log=lambda *_: None)
        return [[r["train/loss"], r["train/grad_norm"]] for r in rows]

    out = {}
    for name, devices, data, fsdp, accum in [("1", 1, 1, 1, 1), ("8x1", 8, 8, 1, 1), ("1x8", 8, 1, 8, 1),
                                             ("1 accum2", 1, 1, 1, 2), ("8x1 accum2", 8, 8, 1, 2)]:
        import fmlm_jax.sharding as sh
        original = sh.make_mesh
        sh.make_mesh = lambda data=-1, fsdp=1, devices=None, n=devices: original(
            data, fsdp, jax.devices()[:n])
        out[name] = run(data, fsdp, accum, os.path.join(sys.argv[2], name.replace(" ", "_")))
        sh.make_mesh = original
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
             " --xla_llvm_disable_expensive_passes=true")
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    workdir = str(tmp_path_factory.mktemp("mesh"))
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_SCRIPT, ROOT, workdir], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("mesh", ["8x1", "1x8"])
def test_the_loop_on_8_devices_matches_one_device(eight_devices, mesh):
    # Same global batch, times, noise and dropout masks on every mesh: only the reduction
    # order differs (dropout 0.1, four AdamW steps). Mixed meshes: tests/test_sharding.py.
    np.testing.assert_allclose(eight_devices[mesh], eight_devices["1"], rtol=2e-5)


def test_gradient_accumulation_on_8_devices_matches_one_device(eight_devices):
    np.testing.assert_allclose(eight_devices["8x1 accum2"], eight_devices["1 accum2"], rtol=2e-5)
    # accumulation draws per-micro-batch times: a different (valid) run from no accumulation
    assert eight_devices["1 accum2"] != eight_devices["1"]


@pytest.mark.slow  # two processes; ~1.5 min on 2 busy cores
def test_two_processes_train_through_jax_distributed(tmp_path):
    """Two processes × 2 CPU devices, started as SLURM would start them (jax.distributed
    finds the coordinator in the SLURM variables), with gloo collectives."""
    procs = []
    for i in range(2):
        env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
               "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
               "SLURM_STEP_NUM_NODES": "1", "FMLM_JAX_DISTRIBUTED": "1",
               "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        cmd = [sys.executable, "-m", "fmlm_jax.main", "--config=configs/synthetic_demo.py",
               f"--workdir={tmp_path}", "--config.model.n_blocks=1", "--config.data.batch_size=8",
               "--config.train.num_steps=4", "--config.train.log_every=2", "--config.train.save_every=2"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "process 0/2: 2 of 4 cpu devices" in outs[0][0]
    assert "step 4/4: loss" in outs[0][0] and "step" not in outs[1][0].replace("process", "")
    data_items = {f for f in os.listdir(tmp_path / "4" / "data") if f.endswith(".json")}
    assert data_items == {"process_0-of-2.json", "process_1-of-2.json"}  # each iterator's position
