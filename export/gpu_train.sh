#!/usr/bin/env bash
# Train the shipped NEU-Seg ARCD bundles, their plain U-Net baselines and (when its trainer and
# config are present) the fuzzy-mask inpainter on ONE GPU machine with no network, in a time box.
#
#   bash export/gpu_train.sh                    # on the GPU machine, from the repository root
#   BUDGET_S=60 DEVICE=cpu bash export/gpu_train.sh --dry-run   # anywhere: tiny CPU rehearsal
#
# Inputs (all inside the repository, since the GPU machine reaches nothing else):
#   .gpudata/neu_seg            a copy of ../shared/data/neu_seg (images/ + annotations/)
#   .gpudata/magnetic_tile      the MT_Free images of the 'train' hash split (fuzzy-mask training)
#   .whl/                       wheels the machine's Python lacks (pydantic, pyzmq; see gpu_check.sh)
# Environment: GPUDATA (the data folder above, default .gpudata), OUT (results folder, default
# gpu-train-out), BUDGET_S (seconds of main training, default 330), DEVICE (default cuda), R_WIDTH / D_WIDTH (default 8 / 12), CALIB_IMAGES /
# VAL_IMAGES (validation frames scored at the end of training; default 128 / 0 = all), JOBS (the
# ARCD/U-Net runs, below), FUZZYMASK=0 (skip the fuzzy-mask run), STAGE1_STEPS + STAGE2_STEPS
# (fixed steps instead of the probe, to rerun a known schedule), DATA_WORKERS (loader processes
# per job, default 2; lower it when many jobs share the machine's cores), EVAL_SPLIT (default val;
# 'none' skips it: each exported NEU bundle is scored there by `inspector evaluate --engine torch`
# on the GPU, JSON in OUT/<name>.eval.json), PACK=0 (no bundle tarballs: a thesis-width graph,
# ~390 MB, cannot come back from the machine anyway; metrics, configs and logs still do).
#
# How the time box is kept: a probe trains every job for PROBE steps at once (the same four
# processes that share the GPU later), measures steps/s from the training logs, and sizes the
# real runs so that every job ends inside BUDGET_S: ARCD gives a quarter of its time to stage 1,
# and the U-Net baselines get exactly ARCD's stage-2 steps (the thesis's same-budget comparison).
# Each finished run is exported with `inspector export onnx` (parity-checked) and packed into
# OUT/<name>.tar.gz with its metrics.json and training log.
set -u -o pipefail

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2
OUT_DIR="${OUT:-$REPO/gpu-train-out}"
BUDGET="${BUDGET_S:-330}"
DEVICE="${DEVICE:-cuda}"
R_WIDTH="${R_WIDTH:-8}"
D_WIDTH="${D_WIDTH:-12}"
PROBE="${PROBE_STEPS:-100}"
WORK="${WORK:-/tmp/gpu-train}"
GPUDATA="$(cd "${GPUDATA:-$REPO/.gpudata}" 2>/dev/null && pwd || echo "${GPUDATA:-$REPO/.gpudata}")"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
mkdir -p "$OUT_DIR" "$WORK"
LOG="$OUT_DIR/gpu_train.log"
say() { echo "[gpu_train $(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || { say "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$REPO"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY - >>"$LOG" 2>&1 <<'EOF'
import torch, pydantic, onnxruntime
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
      "pydantic", pydantic.VERSION, "onnxruntime", onnxruntime.__version__)
EOF
tail -1 "$LOG" >&2
[ -d "$GPUDATA/neu_seg/images" ] || { say "missing $GPUDATA/neu_seg"; exit 2; }

# write one ARCD config from a base config: name, label fraction, reconstruction on/off, steps
arcd_cfg() {  # name base frac recon seed s1 s2 calib val
  $PY - "$@" <<EOF
import sys, yaml
from pathlib import Path
name, base, frac, recon, seed, s1, s2, calib, val = sys.argv[1:]
c = yaml.safe_load(open(base))
c.update(name=name, device="$DEVICE", data_workers=${DATA_WORKERS:-2}, threads=2, log_every=$LOG_EVERY,
         checkpoint_every=1000000, seed=int(seed or c.get("seed", 0)))
c["model"].update(r_base_width=$R_WIDTH, d_base_channels=$D_WIDTH, reconstruction=recon == "1")
c["data"].update(root="$GPUDATA/" + Path(c["data"]["root"]).name, label_fraction=float(frac),
                 calib_images=int(calib), val_images=int(val))
c["stage1"]["steps"] = int(s1)
c["stage2"]["steps"] = int(s2)
yaml.safe_dump(c, open("$WORK/" + name + ".yaml", "w"), sort_keys=False)
EOF
}

# name:base config:label fraction:reconstruction (1 = ARCD, 0 = the plain U-Net baseline)[:seed
# [:stage-1 steps]] (the seed changes initial weights and sample order; the labelled subset stays
# data.label_seed's; a job's own stage-1 steps replace the schedule's in the main phase only, so
# the probe does not size them: use it with STAGE1_STEPS/STAGE2_STEPS, to train one R longer)
NEU=configs/train/arcd-neu.yaml
JOBS="${JOBS:-arcd-neu-gpu:$NEU:1.0:1 arcd-neu-gpu-30:$NEU:0.3:1 unet-neu-gpu:$NEU:1.0:0 unet-neu-gpu-30:$NEU:0.3:0}"

# a malformed entry is named before any GPU time is spent on the others
seen=" "
for j in $JOBS; do
  IFS=: read -r name base frac recon seed own_s1 extra <<<"$j"
  why=""
  if [ -z "$name" ] || [ -z "${recon:-}" ] || [ -n "${extra:-}" ]; then why="expected name:base:fraction:recon[:seed[:stage-1 steps]]"
  elif ! [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]]; then why="name '$name': use letters, digits, '.', '_' and '-' only (it names files)"
  elif [[ "$seen" == *" $name "* ]]; then why="name '$name' is used twice (the runs would overwrite each other)"
  elif [ ! -f "$base" ]; then why="base config '$base' not found"
  elif ! [[ "$frac" =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]]; then why="fraction '$frac' is not in (0, 1]"
  elif ! [[ "$recon" =~ ^[01]$ ]]; then why="reconstruction '$recon' is not 1 (ARCD) or 0 (plain)"
  elif ! [[ "${seed:-0}" =~ ^[0-9]+$ ]]; then why="seed '$seed' is not a whole number"
  elif ! [[ "${own_s1:-1}" =~ ^[1-9][0-9]*$ ]]; then why="stage-1 steps '$own_s1' is not a positive whole number"
  fi
  [ -z "$why" ] || { say "JOBS entry '$j': $why"; exit 2; }
  seen="$seen$name "
done

train_all() {  # phase s1 s2 calib val -> runs in $WORK/<phase>/<name>
  local phase=$1 s1=$2 s2=$3 calib=$4 val=$5 pids=""
  # the probe measures rates between log lines: at least five per stage
  LOG_EVERY=20; [ "$phase" = probe ] && [ "$s2" -lt 100 ] && LOG_EVERY=$(( s2 / 5 > 0 ? s2 / 5 : 1 ))
  mkdir -p "$WORK/$phase"
  for j in $JOBS; do
    IFS=: read -r name base frac recon seed own_s1 <<<"$j"
    [ "$phase" = main ] && [ -n "${own_s1:-}" ] || own_s1=$s1
    arcd_cfg "$name" "$base" "$frac" "$recon" "${seed:-}" "$own_s1" "$s2" "$calib" "$val" || return 1
    $PY -m inspector train arcd --config "$WORK/$name.yaml" --run-dir "$WORK/$phase/$name" \
      >"$WORK/$phase/$name.log" 2>&1 &
    pids="$pids $!"
  done
  local rc=0
  for p in $pids; do wait "$p" || rc=1; done
  return $rc
}

# -- fuzzy-mask inpainter: runs beside the main phase, ends itself by its config's max_minutes --
FZ_PID=""
start_fuzzymask() {
  [ "${FUZZYMASK:-1}" = 1 ] && [ -f configs/train/fuzzymask-mt-gpu.yaml ] && [ -d export/fuzzymask ] \
    || { say "fuzzymask: skipped (FUZZYMASK=0 or no trainer/config)"; return; }
  $PY - <<EOF
import yaml
c = yaml.safe_load(open("configs/train/fuzzymask-mt-gpu.yaml"))
c["device"] = "$DEVICE"
c["max_minutes"] = round(($BUDGET - 20) / 60, 2)
for s in c["data"]["sources"]:
    s["root"] = "$GPUDATA/magnetic_tile"
yaml.safe_dump(c, open("$WORK/fuzzymask-mt-gpu.yaml", "w"), sort_keys=False)
EOF
  $PY -m inspector train fuzzymask --config "$WORK/fuzzymask-mt-gpu.yaml" --run-dir "$WORK/fuzzymask-mt-gpu" \
    >"$WORK/fuzzymask-mt-gpu.log" 2>&1 &
  FZ_PID=$!
  say "fuzzymask: started (pid $FZ_PID)"
}

# -- probe: steps/s of each job with all of them sharing the device ------------------------------
if [ -n "${STAGE1_STEPS:-}" ] && [ -n "${STAGE2_STEPS:-}" ]; then
S1=$STAGE1_STEPS S2=$STAGE2_STEPS   # a rerun of a known schedule: no probe
else
say "probe: $PROBE + $PROBE steps per job, R width $R_WIDTH, D width $D_WIDTH, device $DEVICE"
if ! train_all probe "$PROBE" "$PROBE" 8 8; then
  say "probe failed"; for f in "$WORK"/probe/*.log; do echo "== $f"; tail -25 "$f"; done | tee -a "$LOG"
  exit 1
fi
STEPS="$($PY - "$WORK/probe" "$BUDGET" <<'EOF'
import re, sys
from datetime import datetime
from pathlib import Path
probe, budget = Path(sys.argv[1]), float(sys.argv[2])
pat = re.compile(r"^(\S+ \S+) .*stage (\d) step (\d+)/(\d+)")
def rate(log, stage):
    pts = []
    for line in log.read_text().splitlines():
        m = pat.match(line)
        if m and int(m.group(2)) == stage:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            pts.append((int(m.group(3)), t))
    # skip the first interval (loader start-up) when there are enough points
    if len(pts) < 2 or pts[-1][1] <= pts[0][1]:
        sys.exit(f"{log}: stage {stage} logged {len(pts)} step line(s); the probe needs two or more")
    (a, ta), (b, tb) = (pts[1] if len(pts) > 2 else pts[0]), pts[-1]
    return (b - a) / (tb - ta)
logs = sorted(probe.glob("*.log"))
arcd = [p for p in logs if " stage 1 step " in p.read_text()]   # the U-Net runs have no stage 1
unet = [p for p in logs if p not in arcd]
r1 = min(rate(p, 1) for p in arcd) if arcd else 1e9
r2a = min(rate(p, 2) for p in arcd) if arcd else 1e9
r2u = min(rate(p, 2) for p in unet) if unet else 1e9
t = budget - 45          # start-up, final validation and checkpoint writes
s1 = int(0.25 * t * r1 * 0.85) // 100 * 100
s2 = int(min(0.75 * t * r2a, t * r2u) * 0.85) // 100 * 100
print(max(s1, 100), max(s2, 100))
print(f"rates it/s: stage1 {r1:.1f}, stage2 arcd {r2a:.1f}, unet {r2u:.1f} -> steps {s1} + {s2}",
      file=sys.stderr)
EOF
)" || { say "rate parse failed"; exit 1; }
read -r S1 S2 <<<"$STEPS"
fi
say "main: stage1 $S1 steps, stage2 $S2 steps (budget ${BUDGET}s)"
start_fuzzymask
train_all main "$S1" "$S2" "${CALIB_IMAGES:-128}" "${VAL_IMAGES:-0}"
RC=$?
say "main training done (rc $RC)"
[ -n "$FZ_PID" ] && { wait "$FZ_PID"; say "fuzzymask training done (rc $?)"; }

# -- export and pack --------------------------------------------------------------------------
pack() {  # name run_dir log
  local name=$1 run=$2 log=$3 split=${EVAL_SPLIT:-val}
  if [ -f "$run/metrics.json" ] && $PY -m inspector export onnx --run-dir "$run" --out "$WORK/bundles/$name" \
      >>"$log" 2>&1; then
    cp "$run/metrics.json" "$WORK/bundles/$name/train-metrics.json"
    cp "$run/config.yaml" "$WORK/bundles/$name/train-config.yaml"
    cp "$log" "$WORK/bundles/$name/train.log"
    local root
    root="$($PY -c 'import sys, yaml; d = yaml.safe_load(open(sys.argv[1]))["data"]; print(d["root"] if d.get("source") == "neu-seg" else "")' "$run/config.yaml")"
    if [ "$split" != none ] && [ -n "$root" ]; then
      # written aside and moved on success: a failed evaluation leaves no empty JSON behind
      if $PY -m inspector evaluate --bundle "$WORK/bundles/$name" --data "$root" --format neu-seg \
          --split "$split" --json --engine torch >"$WORK/$name.eval.json" 2>>"$log" \
          && mv "$WORK/$name.eval.json" "$OUT_DIR/$name.eval.json"; then
        say "$name: $split $($PY -c 'import json, sys; r = json.load(open(sys.argv[1])); print("miou %.4f mpa %.4f auroc %.4f f1 %.4f" % (r["miou"], r["mpa"], r["pixel_auroc"], r["f1"]))' "$OUT_DIR/$name.eval.json")"
        cp "$OUT_DIR/$name.eval.json" "$WORK/bundles/$name/eval-$split.json"
      else
        rm -f "$WORK/$name.eval.json"
        say "$name: evaluation failed"; tail -5 "$log" | tee -a "$LOG"
      fi
    fi
    if [ "${PACK:-1}" = 1 ]; then
      tar -C "$WORK/bundles" -czf "$OUT_DIR/$name.tar.gz" "$name"
      say "packed $name ($(du -h "$OUT_DIR/$name.tar.gz" | cut -f1))"
    fi
  else
    say "$name: no bundle"; tail -30 "$log" | tee -a "$LOG"
  fi
}
mkdir -p "$WORK/bundles"
for j in $JOBS; do
  IFS=: read -r name _ <<<"$j"
  pack "$name" "$WORK/main/$name" "$WORK/main/$name.log" &
done
[ -n "$FZ_PID" ] && pack fuzzymask-mt-gpu "$WORK/fuzzymask-mt-gpu" "$WORK/fuzzymask-mt-gpu.log" &
wait
tar -C "$WORK" -czf "$OUT_DIR/logs.tar.gz" --exclude='*.pt' --exclude=bundles . 2>/dev/null
say "done"
exit $RC
