"""What launch/xm_launch.py submits, as plain data: executor, accelerator, image, jobs.

No XManager here: `build_plan` and `describe` run anywhere (the launcher's --dry_run and the
tests use them); only `xm_launch.submit` imports xmanager and turns a Plan into an experiment.

Executors (xmanager 0.8.5):
- local:  xm_local.Local — a Docker container on this machine (GPUs through the NVIDIA runtime);
          workdirs under runs/xm/ on this machine, mounted at the same path.
- vertex: xm_local.Vertex — Vertex AI custom jobs: NVIDIA GPUs, or TPU v2/v3. Vertex mounts
          every Cloud Storage bucket at /gcs/BUCKET (Cloud Storage FUSE), so workdirs are
          /gcs/BUCKET/fmlm/EXPERIMENT[/SWEEP_POINT]: plain files for checkpoints and metrics.jsonl.
- gke:    xm_local.Kubernetes — a GKE cluster with GPU or TPU (v4, v5e, v5p, v6e) node pools
          (`xmanager cluster create`). Workdirs are gs://BUCKET/fmlm/EXPERIMENT[/SWEEP_POINT]
          (Orbax writes gs:// directly; train.py's metrics.jsonl needs a POSIX path until
          it writes through etils.epath: pass --workdir_root=/MOUNT where the cluster mounts
          a shared filesystem).
"""

from __future__ import annotations

import dataclasses
import os

import jobs as jobs_lib

JAX_VERSION = "0.10.2"
XMANAGER_REQUIREMENT = "xmanager==0.8.5.post1"
EXECUTORS = ("local", "vertex", "gke")
GPUS = ("h100", "a100_80gib", "a100", "l4", "v100", "t4")  # xm.ResourceType names
TPUS = ("tpu_v6e", "tpu_v5p", "tpu_v5e", "tpu_v4", "tpu_v3", "tpu_v2")
VERTEX_TPUS = ("tpu_v3", "tpu_v2")  # the only TPUs xmanager 0.8.5's Vertex executor maps
BASE_IMAGE = "python:3.11-slim"  # jax's CUDA wheels bring their own CUDA libraries


@dataclasses.dataclass(frozen=True)
class Plan:
    experiment: str
    executor: str  # one of EXECUTORS
    accelerator: str  # 'cpu' or one of GPUS / TPUS
    quantity: str  # GPUs per job ('8') or a TPU topology ('2x2x1'); '' for cpu
    jax_extra: str  # pip extra of jax: 'cuda12', 'tpu' or '' (CPU)
    workdir_root: str
    base_image: str
    docker_instructions: tuple[str, ...]
    env_vars: dict
    jobs: tuple[jobs_lib.Job, ...]


def jax_extra(accelerator: str) -> str:
    if accelerator == "cpu":
        return ""
    if accelerator in GPUS:
        return "cuda12"
    if accelerator in TPUS:
        return "tpu"
    raise ValueError(f"unknown accelerator {accelerator!r}; expected cpu, one of {GPUS} or one of {TPUS}")


def check_platform(executor: str, accelerator: str, quantity: str) -> None:
    """Refuses combinations the executor cannot run, naming the one that can."""
    if executor not in EXECUTORS:
        raise ValueError(f"--executor must be one of {EXECUTORS}, got {executor!r}")
    jax_extra(accelerator)
    if accelerator in TPUS and executor == "local":
        raise ValueError("the local executor runs Docker on this machine, which has no TPU; on a TPU VM "
                         "use launch/local.sh, else --executor=gke (or vertex for tpu_v2/tpu_v3)")
    if accelerator in TPUS and executor == "vertex" and accelerator not in VERTEX_TPUS:
        raise ValueError(f"xmanager's Vertex executor takes only {VERTEX_TPUS}, not {accelerator}; "
                         "use --executor=gke for TPU v4/v5e/v5p/v6e")
    if accelerator != "cpu" and not quantity:
        kind = "a TPU topology such as 2x2x1" if accelerator in TPUS else "a GPU count such as 8"
        raise ValueError(f"--accelerator={accelerator} needs --quantity ({kind})")


def workdir_root(executor: str, bucket: str, local_root: str = "runs/xm") -> str:
    """The directory below which each experiment's jobs write EXPERIMENT[/SWEEP_POINT]."""
    if executor == "local":
        return os.path.abspath(local_root)
    if not bucket.startswith("gs://") or len(bucket) <= len("gs://"):
        raise ValueError(f"--executor={executor} needs --bucket=gs://YOUR_BUCKET, got {bucket!r}")
    name = bucket.removeprefix("gs://").strip("/")
    if executor == "vertex":
        return f"/gcs/{name}/fmlm"
    return f"gs://{name}/fmlm"


def docker_instructions(repo_dir_name: str, extra: str) -> tuple[str, ...]:
    """Image build steps: the repository with its pinned dependencies, then jax for the device.

    xmanager builds with the repository's parent directory as context, so the repository is
    `repo_dir_name/` there.
    """
    install_jax = f' && python -m pip install "jax[{extra}]=={JAX_VERSION}"' if extra else ""
    return (
        "ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1",
        "RUN python -m pip install --upgrade pip",
        f"COPY {repo_dir_name}/ /fmlm-jax",
        "WORKDIR /fmlm-jax",
        f'RUN python -m pip install -e .{install_jax}',  # training only: no torch
    )


def build_plan(config: str, executor: str = "local", accelerator: str = "cpu", quantity: str = "",
               bucket: str = "", experiment: str = "", sweep: bool = False, overrides=(),
               repo_root: str | None = None, root: str = "") -> Plan:
    """Everything a submission needs, checked: one job per sweep point of `config`.

    root: the workdir root, overriding the one derived from executor and bucket (e.g. a
    Filestore or Cloud Storage FUSE mount that a GKE cluster provides).
    """
    check_platform(executor, accelerator, quantity)
    experiment = experiment or os.path.splitext(os.path.basename(config))[0]
    root = root or workdir_root(executor, bucket)
    repo_root = repo_root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = jax_extra(accelerator)
    # Multi-host TPU slices need jax.distributed.initialize(); it detects the TPU environment.
    env = {"FMLM_JAX_DISTRIBUTED": "1"} if accelerator in TPUS else {}
    return Plan(
        experiment=experiment,
        executor=executor,
        accelerator=accelerator,
        quantity=quantity if accelerator != "cpu" else "",
        jax_extra=extra,
        workdir_root=root,
        base_image=BASE_IMAGE,
        docker_instructions=docker_instructions(os.path.basename(os.path.normpath(repo_root)), extra),
        env_vars=env,
        jobs=tuple(jobs_lib.build_jobs(config, root, sweep, overrides, prefix=experiment)),
    )


def describe(plan: Plan) -> str:
    """The dry run: the image, the resources and each job's exact command line."""
    resources = "cpu" if plan.accelerator == "cpu" else f"{plan.accelerator}={plan.quantity}"
    lines = [
        f"experiment {plan.experiment}: {len(plan.jobs)} job(s) on executor={plan.executor}, "
        f"resources {resources}, jax extra {plan.jax_extra or '(cpu)'}",
        f"image: FROM {plan.base_image}",
        *(f"  {step}" for step in plan.docker_instructions),
    ]
    env = " ".join(f"{k}={v}" for k, v in plan.env_vars.items())
    for job in plan.jobs:
        lines.append(f"job {job.name} → {job.workdir}")
        lines.append("  " + (env + " " if env else "") + jobs_lib.shell_line(job.command("python")))
    return "\n".join(lines)
