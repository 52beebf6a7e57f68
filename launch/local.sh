#!/usr/bin/env bash
# Trains on this host with every device JAX sees (CPU, one or more GPUs, or a single-host TPU VM).
#
#   launch/local.sh [--dry-run] [--platform=cpu|cuda|tpu] --config=configs/NAME.py [--workdir=DIR] \
#       [--config.x=y ...]
#
# WORKDIR defaults to runs/NAME; re-running the same line resumes from its latest checkpoint.
# Every other argument (config overrides, absl flags) is passed through to fmlm_jax.main.
# --platform sets JAX_PLATFORMS (e.g. force CPU on a GPU host). --dry-run prints the command only.
# The interpreter is $PYTHON, else .venv/bin/python when present, else python3.
set -euo pipefail

usage() { sed -n '2,10s/^# \{0,1\}//p' "$0" >&2; exit 2; }

dry_run=0
config=""
workdir=""
platform=""
passthrough=()
for arg in "$@"; do
  case "$arg" in
    --dry-run|--dry_run) dry_run=1 ;;
    --config=*) config="${arg#--config=}" ;;
    --workdir=*) workdir="${arg#--workdir=}" ;;
    --platform=*) platform="${arg#--platform=}" ;;
    -h|--help) usage ;;
    *) passthrough+=("$arg") ;;
  esac
done

if [[ -z "$config" ]]; then
  echo "error: pass --config=configs/NAME.py (see configs/)" >&2
  usage
fi
if [[ ! -f "$config" ]]; then
  echo "error: no config file '$config' (run from the repository root, or give its path)" >&2
  exit 2
fi
if [[ -z "$workdir" ]]; then
  name="$(basename "$config")"
  workdir="runs/${name%.py}"
fi

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

cmd=("$python" -m fmlm_jax.main "--config=$config" "--workdir=$workdir" ${passthrough[@]+"${passthrough[@]}"})
env_prefix=()
if [[ -n "$platform" ]]; then
  case "$platform" in
    cpu|cuda|gpu|tpu) env_prefix=("JAX_PLATFORMS=$platform") ;;
    *) echo "error: --platform must be cpu, cuda or tpu, got '$platform'" >&2; exit 2 ;;
  esac
fi

if [[ "$dry_run" == 1 ]]; then
  line="$(printf '%q ' ${env_prefix[@]+"${env_prefix[@]}"} "${cmd[@]}")"
  echo "${line% }"
  exit 0
fi
exec env ${env_prefix[@]+"${env_prefix[@]}"} "${cmd[@]}"
