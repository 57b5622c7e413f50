#!/usr/bin/env bash
# Runs experiments/multitower_table.py as one process per (section, row) on a many-core machine, then
# merges the cached per-run metrics into one table. Each process writes its runs' metrics to
# <workdir>/table_metrics.json; the final --cached_only pass only reads them.
#   bash experiments/multitower_parallel.sh [workdir_root] [out.md] [per-process timeout seconds]
set -u
root=${1:-runs/multitower}
out=${2:-experiments/results/multitower.md}
limit=${3:-3600}
rows=mind,sa,mt_argmax,mt_serve,mt_serve_repel
cold_rows=mt_serve_repel,mind,sa
mkdir -p "$root/logs"
for section in ml100k_loo ml100k_comirec synthetic; do
  for row in ${rows//,/ }; do
    timeout "$limit" python experiments/multitower_table.py --sections="$section" --rows="$row" \
      --workdir_root="$root" --out="$root/logs/$section-$row.md" >"$root/logs/$section-$row.log" 2>&1 &
  done
done
for row in ${cold_rows//,/ }; do
  timeout "$limit" python experiments/multitower_table.py --sections=cold_start --cold_rows="$row" \
    --workdir_root="$root" --out="$root/logs/cold-$row.md" >"$root/logs/cold-$row.log" 2>&1 &
done
wait
python experiments/multitower_table.py --cached_only --rows="$rows" --cold_rows="$cold_rows" \
  --workdir_root="$root" --out="$out"
