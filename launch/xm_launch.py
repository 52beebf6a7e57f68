"""XManager launcher: one job per config (or per point of its sweep()), locally or on Google Cloud.

    # see exactly what would run (no xmanager needed)
    python launch/xm_launch.py --config=configs/lm1b_flm.py --executor=vertex --accelerator=h100 \
        --quantity=8 --bucket=gs://MY_BUCKET --sweep --dry_run
    # submit (pip install xmanager==0.8.5.post1; gcloud auth; see BUILD.md)
    xmanager launch launch/xm_launch.py -- --config=configs/owt_flm.py --executor=gke \
        --accelerator=tpu_v5p --quantity=4x4x4 --bucket=gs://MY_BUCKET --override=train.lr=1e-4

Executors, accelerators and workdirs: launch/xm_plan.py. Re-launching an experiment with the
same workdirs resumes each job from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `xmanager launch` imports us by path
import xm_plan  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "A get_config() file, e.g. configs/lm1b_flm.py.")
_EXECUTOR = flags.DEFINE_enum("executor", "local", xm_plan.EXECUTORS, "Where the jobs run.")
_ACCELERATOR = flags.DEFINE_enum("accelerator", "cpu", ("cpu", *xm_plan.GPUS, *xm_plan.TPUS),
                                 "Device type of every job.")
_QUANTITY = flags.DEFINE_string("quantity", "", "GPUs per job (e.g. 8) or a TPU topology (e.g. 2x2x1).")
_BUCKET = flags.DEFINE_string("bucket", "", "gs://BUCKET for the workdirs (vertex and gke executors).")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "", "Workdir root instead of the executor's default.")
_EXPERIMENT = flags.DEFINE_string("experiment", "", "Experiment title; default: the config's name.")
_SWEEP = flags.DEFINE_bool("sweep", False, "One job per point of the config's sweep().")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "KEY=VALUE config override for every job.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the image, resources and commands; submit nothing.")


def import_xmanager():
    """(xm, xm_local), or an ImportError that says how to install xmanager."""
    try:
        from xmanager import xm, xm_local
    except ImportError as e:
        raise ImportError(
            f"submitting needs XManager: pip install {xm_plan.XMANAGER_REQUIREMENT} (then run "
            "`xmanager launch launch/xm_launch.py -- FLAGS`); --dry_run works without it"
        ) from e
    return xm, xm_local


def _executor(plan: xm_plan.Plan, xm, xm_local):
    """The xm executor and its spec for the plan's platform and accelerator."""
    quantity = int(plan.quantity) if plan.quantity.isdigit() else plan.quantity  # GPUs | topology
    resources = {} if plan.accelerator == "cpu" else {plan.accelerator: quantity}
    requirements = xm.JobRequirements(**resources)
    if plan.executor == "local":
        mounts = {plan.workdir_root: plan.workdir_root}
        return xm_local.Local(requirements=requirements,
                              docker_options=xm_local.DockerOptions(volumes=mounts)), xm_local.Local.Spec()
    if plan.executor == "vertex":
        return xm_local.Vertex(requirements=requirements), xm_local.Vertex.Spec()
    tpu = None
    if plan.jax_extra == "tpu":
        tpu = xm_local.TpuCapability(tpu_runtime_version="tpu-ubuntu2204-base")
    return xm_local.Kubernetes(requirements=requirements, tpu_capability=tpu), xm_local.Kubernetes.Spec()


def submit(plan: xm_plan.Plan, repo_root: str) -> None:
    xm, xm_local = import_xmanager()
    executor, spec = _executor(plan, xm, xm_local)
    if plan.executor == "local":
        os.makedirs(plan.workdir_root, exist_ok=True)
    with xm_local.create_experiment(experiment_title=plan.experiment) as experiment:
        [executable] = experiment.package([
            xm.python_container(
                executor_spec=spec,
                path=repo_root,
                base_image=plan.base_image,
                docker_instructions=list(plan.docker_instructions),
                entrypoint=xm.ModuleName("fmlm_jax.main"),
            )
        ])
        for job in plan.jobs:
            experiment.add(xm.Job(executable=executable, executor=executor, args=job.args(),
                                  env_vars=dict(plan.env_vars)))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; config overrides go in --override=KEY=VALUE")
    if not _CONFIG.value:
        raise app.UsageError("pass --config=configs/NAME.py")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        plan = xm_plan.build_plan(
            _CONFIG.value, _EXECUTOR.value, _ACCELERATOR.value, _QUANTITY.value, _BUCKET.value,
            _EXPERIMENT.value, _SWEEP.value, _OVERRIDE.value, repo_root=repo_root, root=_WORKDIR_ROOT.value,
        )
    except (AttributeError, FileNotFoundError, KeyError, ValueError) as e:
        raise app.UsageError(str(e.args[0] if e.args else e)) from None
    print(xm_plan.describe(plan))
    if not _DRY_RUN.value:
        try:
            import_xmanager()
        except ImportError as e:
            raise SystemExit(f"error: {e}") from None
        submit(plan, repo_root)


if __name__ == "__main__":
    app.run(main)
