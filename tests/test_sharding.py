"""Mesh, partition rules and the sharded train step (fmlm_jax.sharding).

Multi-device checks run in a subprocess with 8 forced host (CPU) devices: XLA_FLAGS must be
set before jax initialises, and this process has already imported jax with one device.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import ROOT, run_config
from jax.sharding import AxisType, PartitionSpec

from fmlm_jax import sharding, train
from fmlm_jax.model import model_config, param_shapes

TESTS = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(TESTS, "golden", "partition_specs_small.json")
GOLDEN_MESH = {"data": 1, "fsdp": 8}

# The default suite's one 8-device subprocess (XLA_FLAGS must be set before jax initialises):
# the token-chunked losses' sharding, one train step on several meshes against one device,
# the state created sharded, mesh errors. Prints one JSON line of results. The whole loop on
# meshes is LOOP_SCRIPT's (slow).
MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from conftest import quiet, randomize, run_config, synthetic_model, tiny_model_config
    from fmlm_jax import sharding, train

    assert jax.device_count() == 8, jax.devices()
    workdir = sys.argv[1]
    out = {}

    # --- the token-chunked K-wide losses keep the batch sharding (issue #16): compiled for a
    # batch over data=8 against one device, per-device FLOPs (XLA's cost analysis) and
    # all-gathers. Chunking the flattened (B·L) tokens gathered the batch onto every device.
    from jax.sharding import NamedSharding, PartitionSpec
    from fmlm_jax.model import capped_nll
    from fmlm_jax.objectives.distill import chunked

    def nll_loss(f, w, b, tok):  # FLM's fused output cross-entropy
        return capped_nll(f, w, b, tok, 30.0, 64).sum()

    def target_ce(f, g, w):  # a distillation term: a K-wide target, chunked over tokens
        def one(fc, gc):
            target = jax.lax.stop_gradient(jax.nn.softmax(gc @ w, axis=-1))
            return -jnp.sum(target * jax.nn.log_softmax(fc @ w, axis=-1), axis=-1)
        return chunked.token_map(one, 64, f, g).sum()

    def compiled(fn, args):
        c = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).compile()
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"]), sum("all-gather" in line for line in c.as_text().splitlines())

    mesh8 = sharding.make_mesh(8, 1)
    rows, whole = sharding.batch_sharding(mesh8), NamedSharding(mesh8, PartitionSpec())
    f32, B, L, d, K = jnp.float32, 16, 64, 16, 512
    for name, fn, specs in [
            ("capped_nll", nll_loss, [((B, L, d), f32, rows), ((d, K), f32, whole), ((K,), f32, whole),
                                      ((B, L), jnp.int32, rows)]),
            ("token_map", target_ce, [((B, L, d), f32, rows), ((B, L, d), f32, rows), ((d, K), f32, whole)])]:
        flops_1, _ = compiled(fn, [jax.ShapeDtypeStruct(s, t) for s, t, _ in specs])
        flops_8, gathers = compiled(fn, [jax.ShapeDtypeStruct(s, t, sharding=sh) for s, t, sh in specs])
        out["chunked " + name] = {"flops_ratio": flops_8 / flops_1, "all_gathers": gathers}

    # --- one step on several meshes against one device
    config = run_config(model=tiny_model_config(n_blocks=1),  # hidden 32 divides by 8, vocab 23 does not
                        train=dict(lr=1e-3, warmup_steps=1, weight_decay=0.01, grad_clip=1e6))
    shapes = train.train_state_shapes(config)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.params)
    params = jax.jit(randomize)(zeros, jax.random.key(1))  # one compile, not one per leaf
    batch = {"tokens": jax.random.randint(jax.random.key(2), (8, 16), 0, 23)}
    rng = jax.random.key(3)

    def fresh():  # params given: no init, just copies (the steps donate the state)
        return train.create_train_state(config, jax.random.key(0), params=params)

    def host(tree):
        return jax.tree_util.tree_map(np.asarray, tree)

    with jax.default_device(jax.devices()[0]):
        ref_step = train.jit_train_step(config)
        ref_state, ref_metrics = ref_step(fresh(), batch, rng)
        # A second step: the warm-up's first learning rate is 0, so only a second step's
        # params see gradient errors.
        ref_state, ref_metrics2 = ref_step(ref_state, batch, rng)
    ref = host(ref_state)
    out["1"] = {"loss": float(ref_metrics["loss"]), "grad_norm": float(ref_metrics["grad_norm"]),
                "loss2": float(ref_metrics2["loss"])}
    for data, fsdp in [(4, 2), (1, 8)]:  # the loop below covers data=8
        mesh = sharding.make_mesh(data, fsdp)
        state = sharding.place(fresh(), sharding.state_shardings(shapes, mesh))
        step = train.sharded_train_step(config, mesh)
        placed_batch = sharding.place(batch, sharding.batch_sharding(mesh))
        new_state, metrics = step(state, placed_batch, rng)
        new_state, metrics2 = step(new_state, placed_batch, rng)
        diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), host(new_state), ref)
        leaves = jax.tree_util.tree_leaves_with_path(new_state.params)
        sharded = {sharding.path_str(p): [str(x.sharding.spec), list(x.addressable_shards[0].data.shape),
                                          list(x.shape)]
                   for p, x in leaves if x.addressable_shards[0].data.shape != x.shape}
        mu = new_state.opt_state[1][0].mu["vocab_embed"]["embedding"]
        out[f"{data}x{fsdp}"] = {
            "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
            "loss2": float(metrics2["loss"]),
            "max_param_diff": max(jax.tree_util.tree_leaves(diffs.params)),
            "max_ema_diff": max(jax.tree_util.tree_leaves(diffs.ema_params)),
            "max_opt_diff": max(jax.tree_util.tree_leaves(diffs.opt_state)),
            "step": int(new_state.step), "sharded": sharded, "mu_spec": str(mu.sharding.spec),
            "batch_spec": str(sharding.batch_sharding(mesh).spec),
            "axis_types": [str(t) for t in mesh.axis_types],
            "donated": bool(state.params["vocab_embed"]["embedding"].is_deleted()),
        }
    mesh = sharding.make_mesh(1, 8)
    direct = train.init_train_state(config, mesh, jax.random.key(0))
    emb = direct.params["vocab_embed"]["embedding"]
    with jax.default_device(jax.devices()[0]):
        expected = train.create_train_state(config, jax.random.key(0)).params
    out["init"] = {"spec": str(emb.sharding.spec), "shard": list(emb.addressable_shards[0].data.shape),
                   "max_diff": max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
                       lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       direct.params, expected)))}
    errors = {}
    for data, fsdp in [(3, 1), (-1, 3), (2, 2), (-1, -1), (0, 8)]:
        try:
            sharding.make_mesh(data, fsdp)
            errors[f"{data}x{fsdp}"] = None
        except ValueError as e:
            errors[f"{data}x{fsdp}"] = str(e)
    out["errors"] = errors
    out["auto_shape"] = dict(sharding.make_mesh(-1, 2).shape)
    out["subset_shape"] = dict(sharding.make_mesh(2, 2, devices=jax.devices()[:4]).shape)

    print("RESULT " + json.dumps(out))
    """
)

# The heavier half (slow): the whole loop, FLM and FMLM with gradient accumulation, on meshes.
LOOP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import jax
    from conftest import quiet, run_config, synthetic_model
    from fmlm_jax import sharding, train

    assert jax.device_count() == 8, jax.devices()
    workdir = sys.argv[1]
    out = {}

    # --- the loop on meshes: same global batch, times, noise and dropout masks everywhere
    original = sharding.make_mesh

    def loop(name, mode, devices, data, fsdp, accum, teacher=""):
        sharding.make_mesh = lambda data=-1, fsdp=1, devices=None, n=devices: original(
            data, fsdp, jax.devices()[:n])
        # no warm-up and a large lr: the zero-initialised output layer moves at once, so the
        # losses after step 1 depend on every gradient (at init every loss is log K)
        config = run_config(mode, model=synthetic_model(n_blocks=1, dropout=0.1, two_time=mode == "fmlm"),
                            data=dict(batch_size=16), mesh=dict(data=data, fsdp=fsdp),
                            train=dict(num_steps=4, log_every=1, save_every=4, grad_accum_steps=accum,
                                       warmup_steps=1, lr=1e-2),
                            distill=dict(teacher_path=teacher, boundary_prob=4.0))
        rows = train.train_and_evaluate(config, os.path.join(workdir, name), log=quiet)
        sharding.make_mesh = original
        keys = ["train/loss", "train/grad_norm"] + (["train/rows_boundary"] if mode == "fmlm" else [])
        return [[r[k] for k in keys] for r in rows]

    for name, devices, data, fsdp in [("flm 1", 1, 1, 1), ("flm 8x1", 8, 8, 1)]:
        out[name] = loop(name, "flm", devices, data, fsdp, 1)
    # FMLM with accumulation on a mixed mesh: the global row split and the same update.
    teacher = os.path.join(workdir, "flm 1")
    for name, devices, data, fsdp in [("fmlm 1 accum2", 1, 1, 1), ("fmlm 4x2 accum2", 8, 4, 2)]:
        out[name] = loop(name, "fmlm", devices, data, fsdp, 2, teacher)
    print("RESULT " + json.dumps(out))
    """
)


def run_on_8_devices(script: str, workdir: str) -> dict:
    # The two optimisation flags halve the compile time on CPU.
    flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
             " --xla_llvm_disable_expensive_passes=true")
    env = {**os.environ, "XLA_FLAGS": flags,
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, workdir], env=env, cwd=TESTS,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def multi_device(tmp_path_factory):
    return run_on_8_devices(MULTI_DEVICE_SCRIPT, str(tmp_path_factory.mktemp("mesh")))


@pytest.fixture(scope="module")
def multi_device_loop(tmp_path_factory):
    return run_on_8_devices(LOOP_SCRIPT, str(tmp_path_factory.mktemp("mesh_loop")))


@pytest.mark.parametrize("mesh", ["4x2", "1x8"])
def test_sharded_train_step_matches_one_device(multi_device, mesh):
    ref, got = multi_device["1"], multi_device[mesh]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert got["loss2"] == pytest.approx(ref["loss2"], rel=1e-5)
    assert got["step"] == 2
    # An AdamW step moves each weight by ≈ lr = 1e-3; the meshes agree far below that.
    assert got["max_param_diff"] < 5e-6
    assert got["max_ema_diff"] < 5e-6
    assert got["max_opt_diff"] < 5e-6
    assert got["donated"]
    assert got["axis_types"] == [str(AxisType.Auto)] * 2
    assert got["batch_spec"] == str(PartitionSpec(("data", "fsdp")))


def test_token_chunked_losses_keep_the_batch_sharded(multi_device):
    # FLM's fused cross-entropy and the distillation terms chunk along positions within rows:
    # with the batch over 8 devices each does 1/8 of one device's FLOPs and gathers nothing
    # (the flattened (B·L) chunking did all of it on every device, ratio 1, 3 all-gathers).
    for name in ("capped_nll", "token_map"):
        got = multi_device["chunked " + name]
        assert got["all_gathers"] == 0, (name, got)
        assert 0.12 <= got["flops_ratio"] <= 0.14, (name, got)


def test_fsdp_really_shards_params_and_adam_moments(multi_device):
    # fsdp=2 and 8: the 'embed' dims split (data=8 alone replicates: no 'sharded' entries).
    for mesh, n in [("4x2", 2), ("1x8", 8)]:
        sharded = multi_device[mesh]["sharded"]
        qkv_spec, qkv_shard, qkv_shape = sharded["blocks_0/attn_qkv/kernel"]
        assert qkv_spec == str(PartitionSpec("fsdp", None))
        assert qkv_shard == [qkv_shape[0] // n, qkv_shape[1]]
        # vocab 23 is indivisible: the embedding is split along its width 32 instead.
        emb_spec, emb_shard, emb_shape = sharded["vocab_embed/embedding"]
        assert emb_spec == str(PartitionSpec(None, "fsdp")) and emb_shard == [23, 32 // n]
        assert multi_device[mesh]["mu_spec"] == emb_spec  # Adam's moments follow the params


def test_make_mesh_rejects_bad_shapes(multi_device):
    errors = multi_device["errors"]
    assert all(errors.values()), errors
    assert "needs 3 devices but 8" in errors["3x1"]
    assert "does not divide the 8 devices" in errors["-1x3"]
    assert multi_device["auto_shape"] == {"data": 4, "fsdp": 2}
    assert multi_device["subset_shape"] == {"data": 2, "fsdp": 2}


def test_make_mesh_one_device():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    with pytest.raises(ValueError, match="needs 2 devices but 1"):
        sharding.make_mesh(data=2)


def test_indivisible_and_small_tensors_stay_replicated():
    shapes = {"vocab_embed": {"embedding": jax.ShapeDtypeStruct((23, 36), "float32")},
              "blocks_0": {"mlp_0": {"kernel": jax.ShapeDtypeStruct((36, 144), "float32"),
                                     "bias": jax.ShapeDtypeStruct((144,), "float32")}}}
    specs = sharding.param_partition_specs(shapes, {"data": 1, "fsdp": 8})
    assert specs["vocab_embed"]["embedding"] == PartitionSpec(None, None)
    assert specs["blocks_0"]["mlp_0"]["kernel"] == PartitionSpec(None, None)
    assert specs["blocks_0"]["mlp_0"]["bias"] == PartitionSpec(None)
    # Without a mesh: the rules' intent.
    specs = sharding.param_partition_specs(shapes)
    assert specs["vocab_embed"]["embedding"] == PartitionSpec(None, "fsdp")
    # 'vocab' takes fsdp when the width cannot.
    specs = sharding.param_partition_specs(
        {"vocab_embed": {"embedding": jax.ShapeDtypeStruct((24, 36), "float32")}}, {"fsdp": 8})
    assert specs["vocab_embed"]["embedding"] == PartitionSpec("fsdp", None)


def small_model_specs() -> dict:
    shapes = param_shapes(model_config("small", 30522))  # eval_shape: nothing allocated
    specs = sharding.param_partition_specs(shapes, GOLDEN_MESH)
    flat = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    return {sharding.path_str(path): str(spec) for path, spec in flat}


def test_partition_specs_match_golden_file():
    """To regenerate after a deliberate change: FMLM_UPDATE_GOLDEN=1 pytest this test."""
    specs = small_model_specs()
    if os.environ.get("FMLM_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump({"mesh": GOLDEN_MESH, "specs": specs}, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert golden["mesh"] == GOLDEN_MESH
    assert specs == golden["specs"]


def test_state_shardings_cover_the_train_state():
    mesh = sharding.make_mesh()
    shapes = train.train_state_shapes(run_config())
    sh = sharding.state_shardings(shapes, mesh)
    assert jax.tree_util.tree_structure(sh) == jax.tree_util.tree_structure(shapes)
    assert sh.step.spec == PartitionSpec()
    adam = sh.opt_state[1][0]
    assert adam.count.spec == PartitionSpec()
    assert adam.mu["blocks_0"]["attn_qkv"]["kernel"].spec == PartitionSpec("fsdp", None)


def test_init_train_state_creates_the_state_sharded(multi_device):
    init = multi_device["init"]
    assert init["spec"] == str(PartitionSpec(None, "fsdp")) and init["shard"] == [23, 4]
    assert init["max_diff"] == 0.0  # the same init as train.create_train_state


@pytest.mark.slow
def test_the_loop_on_8_devices_matches_one_device(multi_device_loop):
    # Same global batch, times, noise and dropout masks on every mesh: only the reduction
    # order differs (dropout 0.1, four AdamW steps).
    np.testing.assert_allclose(multi_device_loop["flm 8x1"], multi_device_loop["flm 1"], rtol=2e-5, atol=1e-6)


@pytest.mark.slow
def test_distillation_with_accumulation_on_a_mixed_mesh_matches_one_device(multi_device_loop):
    one, mesh = multi_device_loop["fmlm 1 accum2"], multi_device_loop["fmlm 4x2 accum2"]
    np.testing.assert_allclose(mesh, one, rtol=2e-5, atol=1e-6)
    # 16 rows, f = 0.5, P = 4: ⌊16·(0.5 + 0.125)⌋ − 8 = 2 boundary rows in every update
    # (a split per micro-batch of 8 rows would give 1, per device of 1 row none).
    assert [round(row[2] * 16) for row in mesh] == [2, 2, 2, 2]


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
        cmd = [sys.executable, "-m", "fmlm_jax.main", "--config=configs/tiny_flm.py",
               f"--workdir={tmp_path}", "--config.model.n_blocks=1", "--config.data.batch_size=8",
               "--config.train.num_steps=4", "--config.train.log_every=2", "--config.train.save_every=2",
               "--config.train.eval_every=0", "--config.train.sample_every=0"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "process 0/2: 2 of 4 cpu devices" in outs[0][0]
    assert "step 4/4: loss" in outs[0][0] and "step" not in outs[1][0].replace("process", "")
    data_items = {f for f in os.listdir(tmp_path / "4" / "data") if f.endswith(".json")}
    assert data_items == {"process_0-of-2.json", "process_1-of-2.json"}  # each iterator's position
