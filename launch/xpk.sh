#!/usr/bin/env bash
# Submits one training job to a GKE cluster with xpk (TPU slices or GPU node pools).
#
#   launch/xpk.sh --cluster=my-cluster --device-type=v5litepod-16 --num-slices=1 \
#       --config=experiments/configs/two_tower_synthetic.py --workdir=gs://my-bucket/runs/tt [--dry-run]
#   launch/xpk.sh --cluster=my-gpu-cluster --device-type=h100-80gb-8 --num-nodes=2 \
#       --config=... --workdir=gs://... [--workload=name] [--project=p] [--zone=z] [-- extra mvhan-train flags]
#
# xpk builds an image from this directory on --base-docker-image and runs the same command in every
# pod; mvhan_jax/distributed.py then calls jax.distributed.initialize() with no arguments: on TPU JAX
# reads the slice from the TPU environment, on GPU pods (a JobSet) it asks the Kubernetes API, for
# which the image gets jax[k8s].
set -euo pipefail

CLUSTER="" DEVICE_TYPE="" NUM_SLICES=1 NUM_NODES=1 CONFIG="" WORKDIR="" PROJECT="" ZONE=""
WORKLOAD="mvhan-$(date +%m%d-%H%M%S)" BASE_IMAGE="python:3.11" DRY_RUN=0
EXTRA=()
usage() { sed -n '2,12p' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster=*) CLUSTER="${1#*=}" ;;
    --device-type=*|--device_type=*) DEVICE_TYPE="${1#*=}" ;;
    --num-slices=*|--num_slices=*) NUM_SLICES="${1#*=}" ;;
    --num-nodes=*|--num_nodes=*) NUM_NODES="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --workload=*) WORKLOAD="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --base-docker-image=*) BASE_IMAGE="${1#*=}" ;;
    --dry-run|--dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
  shift
done
for v in CLUSTER DEVICE_TYPE CONFIG WORKDIR; do
  if [[ -z "${!v}" ]]; then echo "missing --$(echo "$v" | tr '[:upper:]_' '[:lower:]-')=..." >&2; usage 2; fi
done

run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# TPU device types are TPU generations (v4-8, v5litepod-16, v5p-128, v6e-256); the rest are GPUs.
if [[ "$DEVICE_TYPE" == v[0-9]* ]]; then
  PIP_ARGS="-e '.[tpu]'"; SCALE=(--num-slices="$NUM_SLICES")
else
  PIP_ARGS="-e '.[gpu,gcs]' 'jax[k8s]'"; SCALE=(--num-nodes="$NUM_NODES")
fi
SCOPE=()
if [[ -n "$PROJECT" ]]; then SCOPE+=(--project="$PROJECT"); fi
if [[ -n "$ZONE" ]]; then SCOPE+=(--zone="$ZONE"); fi

TRAIN="pip install -q $PIP_ARGS && python -m mvhan_jax.main --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do TRAIN+=" $(printf '%q' "$a")"; done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
run xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --device-type="$DEVICE_TYPE" "${SCALE[@]}" \
  --base-docker-image="$BASE_IMAGE" --script-dir="$ROOT" "${SCOPE[@]+"${SCOPE[@]}"}" --command="$TRAIN"
