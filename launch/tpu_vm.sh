#!/usr/bin/env bash
# Runs one training job on every worker of a Cloud TPU VM (single host or a multi-host slice).
#
#   launch/tpu_vm.sh --tpu=my-v5e-16 --zone=us-west4-a --config=experiments/configs/two_tower_synthetic.py \
#       --workdir=gs://my-bucket/runs/tt [--project=my-project] [--setup] [--dry-run] [-- extra mvhan-train flags]
#
# Each worker runs the same command; mvhan_jax/distributed.py calls jax.distributed.initialize() with
# no arguments on TPU (JAX reads the slice topology from the TPU metadata). --setup first copies the
# repository to every worker and installs it with the [tpu] extra. The workdir must be shared storage
# (a gs:// bucket): orbax writes checkpoints from every host, metrics are written by process 0 only.
set -euo pipefail

TPU="" ZONE="" PROJECT="" CONFIG="" WORKDIR="" SETUP=0 DRY_RUN=0 REPO_DIR="mvhan_jax"
EXTRA=()
usage() { sed -n '2,11p' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --repo_dir=*) REPO_DIR="${1#*=}" ;;
    --setup) SETUP=1 ;;
    --dry-run|--dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
  shift
done
for v in TPU ZONE CONFIG WORKDIR; do
  if [[ -z "${!v}" ]]; then echo "missing --$(echo "$v" | tr '[:upper:]' '[:lower:]')=..." >&2; usage 2; fi
done

run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
SCOPE=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then SCOPE+=(--project="$PROJECT"); fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

if [[ "$SETUP" == 1 ]]; then
  run "${GCLOUD[@]}" scp --recurse "$ROOT" "$TPU:~/$REPO_DIR" --worker=all "${SCOPE[@]}"
  run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${SCOPE[@]}" \
    --command="cd ~/$REPO_DIR && python3 -m pip install -q -e '.[tpu]'"
fi

TRAIN="cd ~/$REPO_DIR && python3 -m mvhan_jax.main --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do TRAIN+=" $(printf '%q' "$a")"; done
run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${SCOPE[@]}" --command="$TRAIN"
