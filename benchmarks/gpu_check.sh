#!/usr/bin/env bash
# The GPU check of issue #8, prepared to run unattended on a GPU machine without network access.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gc   # anywhere: CPU only, checks the script
#
#   bash benchmarks/gpu_check.sh --fetch-wheels  # where a registry is reachable: fills .whl/ (7 MB)
#   python benchmarks/pack_ort_gpu.py --version 1.31.1 --sm 90 --out .whl   # and onnxruntime-gpu
#                                                # for an H100/H200 in two parts (40 + 30 MB)
#
# Options: --out DIR (default $OUT, else ./gpu-check-out), --wheels DIR (default .whl),
#          --budget-s S (default 420: the Python part stops starting new work after S seconds),
#          --no-thesis (skip the untrained thesis-width ARCD), --dry-run,
#          --backends LIST (comma-separated, default all: torch-eager,ort-cpu,ort-cuda,ort-cuda-tf32,
#          ort-trt,trt-fp32,trt-fp16,trt-int8),
#          --ort-parts DIR (where onnxruntime_gpu-*-smNN.tar.xz.partNN made by
#          benchmarks/pack_ort_gpu.py lie; default the wheels folder): joined, unpacked and put
#          ahead of the image's CPU onnxruntime, with the image's pip CUDA libraries on
#          LD_LIBRARY_PATH.
#
# What it does, recording every step (and every skip, with its reason) in DIR/gpu_check.json:
#  1. installs the wheels found in the wheels folder (pydantic, pyzmq, pycuda's dependencies, ...)
#     into /tmp/inspector-site with pip --no-index: the machine has no registry;
#  2. builds pycuda from the sdist in that folder with the machine's nvcc if pycuda is missing;
#  3. records the environment (GPU, driver, CUDA, torch, onnxruntime providers, TensorRT);
#  4. checks the tensorrt engine's CUDA side with pycuda (a copy standing in for TensorRT):
#     primary context from two threads, pinned/device buffers, two streams, ordering, tickets;
#  5. for every shipped bundle (the toy graph where none is shipped) and an untrained thesis-width
#     ARCD: builds native TensorRT engines fp32/fp16/int8 where TensorRT imports, times torch
#     eager, ORT CPU/CUDA/TensorRT-EP and the engines on 256x256 and 256x1600 frames, checks
#     parity (fp32: max |diff| of probabilities <= 1e-3 vs ORT CPU; fp16: published-mask IoU
#     >= 0.99 vs fp32) and grab-to-publish latency through the pipeline;
#  6. writes DIR/gpu_check.json, DIR/gpu_check.png and DIR/gpu_check.log.
# Exit status: 0 done, 1 a parity check failed, 2 bad arguments; the JSON is written either way.
set -u -o pipefail

DRY=0
FETCH=0
THESIS=1
OUT_DIR="${OUT:-gpu-check-out}"
WHEELS=".whl"
BUDGET=420
BACKENDS=""
ORT_PARTS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    --no-thesis) THESIS=0 ;;
    --out) OUT_DIR="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --budget-s) BUDGET="$2"; shift ;;
    --backends) BACKENDS="$2"; shift ;;
    --ort-parts) ORT_PARTS="$2"; shift ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"

if [ "$FETCH" = 1 ]; then
  # what the GPU machine's image lacks for this check (Python 3.12, x86-64): the runtime's
  # pydantic and pyzmq, pycuda's pure-Python dependencies, and pycuda as source (built there)
  mkdir -p "$WHEELS"
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0 pyzmq==27.3.0 pytools==2026.1.1 platformdirs==4.14.8 mako==1.4.3 \
    siphash24==1.9 || exit 1
  $PY -m pip download -q --no-deps --no-binary pycuda -d "$WHEELS" pycuda==2026.1 || exit 1
  ls -la "$WHEELS"
  exit 0
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
WORK="$(mktemp -d /tmp/gpu-check.XXXXXX)"
export PYTHONUNBUFFERED=1
: > "$LOG"
say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

say "repo $REPO, python $($PY -c 'import sys; print(sys.version.split()[0])' 2>&1), out $OUT_DIR, dry-run $DRY"
INSTALL_LOG="$WORK/install.log"
: > "$INSTALL_LOG"
SITE=/tmp/inspector-site
if [ "$DRY" = 0 ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  # one wheel per distribution (the newest by name order): two versions would stop pip
  PICK=$($PY - "$WHEELS" <<'EOF'
import re, sys
from pathlib import Path
def version(w):
    return [int(x) if x.isdigit() else 0 for x in re.split(r"[.+]", w.name.split("-")[1])]
best = {}
for w in sorted(Path(sys.argv[1]).glob("*.whl"), key=version):
    name = re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
    best[name] = w
print(" ".join(str(p) for p in best.values()))
EOF
)
  say "installing $(echo $PICK | wc -w) wheel(s) from $WHEELS into $SITE"
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $PICK >>"$INSTALL_LOG" 2>&1; then
    echo "ok: $PICK" >>"$INSTALL_LOG"
  else
    say "pip install of the carried wheels failed (see the JSON's install_log); going on"
  fi
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels installed (dry run or no $WHEELS/*.whl)" >>"$INSTALL_LOG"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

# onnxruntime-gpu, carried as parts (it is too large for one transfer): see pack_ort_gpu.py
FIRST_PART=$(ls "${ORT_PARTS:-$WHEELS}"/onnxruntime_gpu-*.tar.xz.part00 2>/dev/null | tail -n 1)
if [ "$DRY" = 0 ] && [ -n "$FIRST_PART" ]; then
  ORT_SITE="${ORT_GPU_SITE:-/tmp/inspector-ort-gpu}"
  rm -rf "$ORT_SITE" && mkdir -p "$ORT_SITE"
  if cat "${FIRST_PART%.part00}".part* | xz -d | tar -x -C "$ORT_SITE" 2>>"$INSTALL_LOG"; then
    export PYTHONPATH="$ORT_SITE:$PYTHONPATH"
    NVLIBS=$($PY - <<'EOF'
import glob, os, site
dirs = {os.path.dirname(f) for sp in site.getsitepackages()
        for f in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
EOF
)
    [ -n "$NVLIBS" ] && export LD_LIBRARY_PATH="$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "onnxruntime-gpu unpacked from ${FIRST_PART%.part00}.part* into $ORT_SITE"
    echo "onnxruntime-gpu: ${FIRST_PART%.part00}.part* -> $ORT_SITE; LD_LIBRARY_PATH += $NVLIBS" >>"$INSTALL_LOG"
  else
    say "could not unpack ${FIRST_PART%.part00}.part* (a part missing or truncated?); going on without it"
  fi
elif [ "$DRY" = 0 ] && [ -n "$ORT_PARTS" ]; then
  say "--ort-parts $ORT_PARTS: no onnxruntime_gpu-*.tar.xz.part00 there; going on with the installed onnxruntime"
fi

ARGS=(gpu-check --out "$OUT_DIR/gpu_check.json" --work "$WORK" --budget-s "$BUDGET" --install-log "$INSTALL_LOG")
[ "$DRY" = 1 ] && ARGS+=(--dry-run)
[ "$THESIS" = 1 ] && ARGS+=(--thesis)
[ -n "$BACKENDS" ] && ARGS+=(--backends "$BACKENDS")
SDIST=$(ls "$WHEELS"/pycuda-*.tar.gz 2>/dev/null | tail -n 1)
[ -n "$SDIST" ] && ARGS+=(--pycuda-sdist "$SDIST")

# the Python part stops starting work at the budget; the hard limit leaves it time to write
timeout --kill-after=10 $((BUDGET + 45)) "$PY" benchmarks/engines.py "${ARGS[@]}" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
  say "the Python part ran past its hard limit; $OUT_DIR/gpu_check.json holds what was done"
fi
say "exit $RC; wrote $(ls "$OUT_DIR" | tr '\n' ' ')"
rm -rf "$WORK"
exit "$RC"
