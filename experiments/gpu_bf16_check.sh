#!/usr/bin/env bash
# bfloat16 on a GPU: the isolated-op diagnosis (experiments/diagnose_bf16.py) and bench_accel.py for
# MIND and MV-HAN at batch 1,024 and 8,192 in float32 / bfloat16 (the train step's own casting) /
# bfloat16_fixed (mvhan_jax/precision.py). Everything lands in $OUT; the whole run is bounded to
# about 7.5 minutes (each phase under `timeout`, the benchmark gets what the diagnosis left).
#
#   bash experiments/gpu_bf16_check.sh --prepare   # here, once: data + wheels into .gl/ and .whl/
#   bash experiments/gpu_bf16_check.sh             # on the GPU machine (carry .gl and .whl)
#   PYTHON=.venv/bin/python bash experiments/gpu_bf16_check.sh --small   # CPU smoke, ~3 min
#
# The device machine has the working tree only and may have no network (WORKSPACE.md, "Accelerator
# runs from source"). --prepare copies the MovieLens-100k files and their built TFDS records into
# .gl/ (MVHAN_DATA_DIR there: no download, no rebuild) and downloads wheels of the data stack that
# the last GPU machine lacked into .whl/ (both git-ignored, ~25 MB + wheels; carry them). On the
# machine, jax is used as found if it has a GPU backend (a newer jax than the 0.10.x pin worked
# before); otherwise jax[cuda12] matching setup.cfg's pin is installed from .whl/ or PyPI. Other
# missing modules are installed one by one (--no-deps, .whl/ first, then PyPI) into a private
# --target directory put first on PYTHONPATH, so a preinstalled jax is never replaced.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
MODE=gpu
case "${1:-}" in
  "") ;;
  --small) MODE=small ;;
  --prepare) MODE=prepare ;;
  *) echo "usage: $0 [--small | --prepare]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
JAX_PIN='jax[cuda12]>=0.10.2,<0.11'   # setup.cfg [options.extras_require] gpu
# Modules the repo imports that the last GPU machine lacked (plus their pure-Python dependencies).
DATA_STACK="grain array-record ml-collections tensorflow-datasets etils promise simple-parsing
  docstring-parser immutabledict tensorflow-metadata googleapis-common-protos toml termcolor dm-tree
  wrapt psutil tqdm simplejson humanize"

if [ "$MODE" = prepare ]; then
  src=${MVHAN_DATA_DIR:-$HOME/.cache/mvhan_jax}
  mkdir -p .gl .whl
  for d in ml-100k tfds; do
    [ -d "$src/$d" ] && cp -r "$src/$d" .gl/ || echo "missing $src/$d (run a MovieLens test once first)"
  done
  # The versions this checkout is tested with; wheels for the Python versions a GPU image may have.
  pins=$("$PY" - "$DATA_STACK" <<'EOF'
import importlib.metadata as md, sys
out = []
for name in sys.argv[1].split():
  try:
    out.append(f"{name}=={md.version(name)}")
  except md.PackageNotFoundError:
    out.append(name)
print(" ".join(out))
EOF
)
  # A package without a wheel (promise) is built into one here: offline, pip cannot build an sdist.
  for pkg in $pins; do
    for v in ${WHEEL_PYTHONS:-3.10 3.11 3.12 3.13}; do
      "$PY" -m pip download -q --no-deps --only-binary=:all: --dest .whl --python-version "$v" \
        --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 "$pkg" 2>/dev/null
    done
    stem=$(echo "${pkg%%==*}" | tr '-' '_')
    compgen -G ".whl/${stem}-*" >/dev/null || compgen -G ".whl/${stem,,}-*" >/dev/null \
      || "$PY" -m pip wheel -q --no-deps --wheel-dir .whl "$pkg" \
      || echo "could not download $pkg"
  done
  du -sh .gl .whl
  echo "carry: [\".gl\", \".whl\"]  command: bash experiments/gpu_bf16_check.sh"
  exit 0
fi

START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
OUT=${OUT:-$REPO/gpu_bf16_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "== $(date -u) mode=$MODE repo=$REPO out=$OUT python=$($PY --version 2>&1)"
git -C "$REPO" log --oneline -1 2>/dev/null
git -C "$REPO" status --short 2>/dev/null | head -20

SITE=${BF16_SITE:-/tmp/bf16_site}
mkdir -p "$SITE"
export PYTHONPATH="$SITE:$REPO:$REPO/experiments${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$REPO/.gl/ml-100k" ] && export MVHAN_DATA_DIR="$REPO/.gl"
echo "MVHAN_DATA_DIR=${MVHAN_DATA_DIR:-<default>}"
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

pip_install() {  # pip_install ARGS...: from .whl/ when present, else (or on failure) from PyPI
  if [ -d "$REPO/.whl" ] && "$PY" -m pip install -q --target "$SITE" --upgrade --no-index \
      --find-links "$REPO/.whl" "$@"; then
    return 0
  fi
  timeout 240 "$PY" -m pip install -q --target "$SITE" --upgrade --timeout 20 "$@"
}

platform() { "$PY" -c 'import jax; print(jax.devices()[0].platform)' 2>/dev/null | tail -1; }
"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tail -3
if [ "$MODE" = gpu ] && [ "$(platform)" != gpu ]; then
  echo "== no GPU backend in this jax: installing $JAX_PIN into $SITE ($(elapsed) s)"
  pip_install "$JAX_PIN" || echo "jax install failed"
  "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tail -3
  if [ "$(platform)" != gpu ]; then
    echo "FATAL: still no GPU backend; nothing measured (see $OUT/log.txt)"
    exit 1
  fi
fi

# Install missing modules one at a time until the repo, the benchmark and the data load.
declare -A TRIED=()
for _ in $(seq 1 30); do
  missing=$("$PY" - <<'EOF' 2>"$OUT/probe_err.txt"
import sys
try:
  import diagnose_bf16  # noqa: F401  (loads bench_accel: mvhan_jax, the data stack)
  diagnose_bf16.bench_accel._experiment("mind")  # loads MovieLens (TFDS records under MVHAN_DATA_DIR)
except ModuleNotFoundError as e:
  print(e.name.split(".")[0])
EOF
)
  # TFDS logs a missing dependency and fails later with an AttributeError: take the name from the log.
  [ -z "$missing" ] && missing=$(grep -oE "No module named '[A-Za-z0-9_.]+'" "$OUT/probe_err.txt" \
    | head -1 | sed -E "s/.*'([A-Za-z0-9_]+).*/\1/")
  [ -z "$missing" ] && break
  case "$missing" in
    absl) pkg=absl-py ;; google) pkg=protobuf ;; tree) pkg=dm-tree ;; yaml) pkg=PyYAML ;;
    orbax) pkg=orbax-checkpoint ;; PIL) pkg=pillow ;; markdown_it) pkg=markdown-it-py ;;
    *) pkg=$(echo "$missing" | tr '_' '-') ;;
  esac
  if [ -n "${TRIED[$pkg]:-}" ]; then
    echo "FATAL: $missing still missing after installing $pkg"; tail -5 "$OUT/probe_err.txt"; exit 1
  fi
  TRIED[$pkg]=1
  echo "== installing $pkg (module $missing missing) ($(elapsed) s)"
  pip_install --no-deps "$pkg" || echo "install of $pkg failed"
done
if [ -s "$OUT/probe_err.txt" ]; then echo "probe stderr (last lines):"; tail -5 "$OUT/probe_err.txt"; fi
"$PY" -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|flax|optax|numpy|grain|tensorflow-datasets|orbax)" \
  > "$OUT/versions.txt"
ls "$SITE" > "$OUT/site_installed.txt" 2>/dev/null
echo "== setup done ($(elapsed) s)"

if [ "$MODE" = small ]; then
  DIAG_ARGS=(--small)
  BENCH_ARGS=(--models=mind --batch_sizes=128 --steps=3 --repeats=1 --pipeline_steps=0 --peak_n=512)
  DIAG_LIMIT=240; TOTAL_LIMIT=420
else
  DIAG_ARGS=()
  # shellcheck disable=SC2054  # the commas are the flags' list syntax
  BENCH_ARGS=(--models=mind,mvhan --batch_sizes=1024,8192 --steps=20 --repeats=3 --pipeline_steps=20)
  DIAG_LIMIT=210; TOTAL_LIMIT=450
fi

# The benchmark needs ~3 minutes on a GPU: the diagnosis gets at most what leaves it that.
room=$(( TOTAL_LIMIT - $(elapsed) - 180 ))
[ "$room" -lt "$DIAG_LIMIT" ] && DIAG_LIMIT=$(( room > 60 ? room : 60 ))
echo "== diagnose_bf16, at most ${DIAG_LIMIT} s ($(elapsed) s)"
timeout "$DIAG_LIMIT" "$PY" experiments/diagnose_bf16.py "${DIAG_ARGS[@]}" --out_dir="$OUT" 2>&1 \
  | grep -v "^WARNING: All log messages before absl"
echo "diagnose_bf16 exit ${PIPESTATUS[0]} ($(elapsed) s)"

left=$(( TOTAL_LIMIT - $(elapsed) ))
[ "$left" -lt 60 ] && left=60
echo "== bench_accel, ${left} s left ($(elapsed) s)"
timeout "$left" "$PY" experiments/bench_accel.py "${BENCH_ARGS[@]}" \
  --dtypes=float32,bfloat16_tables,bfloat16,bfloat16_fixed --out_dir="$OUT" 2>&1 \
  | grep -v "^WARNING: All log messages before absl"
echo "bench_accel exit ${PIPESTATUS[0]} (124 = cut by the time limit; rows so far are in the JSON)"
ls -la "$OUT"
echo "== done in $(elapsed) s"
