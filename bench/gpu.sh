#!/usr/bin/env bash
# One prepared GPU benchmark (about 10 minutes on one H100/H200, nothing downloaded, no real dataset needed), issue
# 27's targets first:
#   1. bench/epoch.py (issue 27): whole epochs of the full pipeline (train, APL pass, val, test, checkpoints),
#      VOC-like (20 classes, batch 8) and COCO-like (80 classes, batch 16), faithful against each fast combination
#      (image cache, --cuda-graphs model / step, bf16 + channels-last, --eval-batch-size, --image-decode device),
#      then --image-decode device against PIL (max abs pixel difference, img/s);
#   2. equal mAP: the demo at its own settings (EM_APL, ResNet-18 from scratch at 48 px, 6 epochs), seeds 0, 1, 2,
#      faithful against --image-cache ram --cuda-graphs model (the same numbers expected) and against the fast
#      statistical combination (+ --cuda-graphs step --amp bf16 --channels-last --eval-batch-size 128);
#   3. bench/step.py, ResNet-50 at 448 px, batch 16 and 8 (every amp x channels-last combination);
#   4. bench/loader.py at 448 px over the 145 CUB JPEGs of tests/data re-encoded at 500 px (full-size decode cost),
#      0 and 8 workers;
#   5. short real runs of main.py on the demo with ResNet-50 at 128 px, 2 epochs, faithful against --image-cache
#      ram --amp bf16 --channels-last --cudnn-benchmark and against --image-cache ram --cuda-graphs model: wall time
#      and test mAP of each;
#   6. the compiled bf16 + channels-last step last, as its warm-up takes long (cut when the budget is spent).
# Writes one JSON: $OUT/gpu_bench.json if $OUT is set, else bench/gpu_bench.json (logs beside it, *_logs/).
# Every step has a timeout, all within a total budget (BENCH_BUDGET_S, default 570 s); a failing, timed-out or
# skipped step is recorded and the script goes on.
#   BENCH_SMOKE=1 bash bench/gpu.sh   # CPU, tiny sizes: proves every command starts (no GPU needed)
#   BENCH_SKIP=main_fast,step_b16_compile   # steps recorded as skipped (tests/test_gpu_speed.py skips the slow ones)
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=${BENCH_SMOKE:-0}
OUTDIR=${OUT:-bench}
mkdir -p "$OUTDIR"
JSON="$OUTDIR/gpu_bench.json"
LOGS="$OUTDIR/gpu_bench_logs"
mkdir -p "$LOGS"
WORK=$(mktemp -d /tmp/gpu_bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
RECORDS="$WORK/records.jsonl"
: > "$RECORDS"
PY=${PYTHON:-python}

if [[ "$SMOKE" == 1 ]]; then
  DEVICE=cpu; GPU=cpu; ARCH=resnet18; SIZE=64; STEPS=2; WARM=1; UPSCALE=160; WORKERS=2
  DEMO_ARGS=(--arch resnet18 --image-size 32 --epochs 2 --warmup-epoch 1 --num-workers 0)
  SEEDS=(0); SEED_ARGS=(--image-size 32 --epochs 2 --warmup-epoch 1)
  BUDGET=${BENCH_BUDGET_S:-900}
  STEP_CAP=${BENCH_STEP_CAP_S:-60}  # a step cut by this cap has still shown that its command starts
else
  DEVICE=cuda; GPU=0; ARCH=resnet50; SIZE=448; STEPS=20; WARM=3; UPSCALE=500; WORKERS=8
  DEMO_ARGS=(--arch resnet50 --image-size 128 --epochs 2 --warmup-epoch 1 --num-workers 8)
  SEEDS=(0 1 2); SEED_ARGS=()  # the demo's own settings
  BUDGET=${BENCH_BUDGET_S:-570}
  STEP_CAP=${BENCH_STEP_CAP_S:-600}
fi
START=$(date +%s)

# run_step NAME TIMEOUT_S CMD...: runs CMD with a timeout (cut to what is left of the budget), logs to
# $LOGS/NAME.log, appends {name, command, rc, status, seconds, log_tail} to the records; never fails itself.
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local rc=0 status t0 t1
  if [[ ",${BENCH_SKIP:-}," == *",$name,"* ]]; then
    status=skipped; rc=-1; t0=$(date +%s.%N); t1=$t0
    echo "[gpu.sh] $name: skipped (BENCH_SKIP)" | tee "$LOGS/$name.log"
  elif (( left < 15 )); then
    status=skipped; rc=-1; t0=$(date +%s.%N); t1=$t0
    echo "[gpu.sh] $name: skipped (${left} s of the budget left)" | tee "$LOGS/$name.log"
  else
    (( limit > left )) && limit=$left
    (( limit > STEP_CAP )) && limit=$STEP_CAP
    echo "[gpu.sh] $name (timeout ${limit} s): $*"
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status=timeout; else status=failed; fi
    echo "[gpu.sh] $name: $status (rc $rc, $(awk "BEGIN{printf \"%.1f\", $t1-$t0}") s)"
    tail -n 25 "$LOGS/$name.log" | sed 's/^/    /'
  fi
  "$PY" - "$RECORDS" "$name" "$rc" "$status" "$t0" "$t1" "$LOGS/$name.log" "$@" <<'EOF' || true
import json, sys
records, name, rc, status, t0, t1, log, *cmd = sys.argv[1:]
try:
    tail = open(log, errors="replace").read()[-2000:]
except OSError:
    tail = ""
rec = {"name": name, "command": cmd, "rc": int(rc), "status": status, "seconds": round(float(t1) - float(t0), 2)}
if status != "ok":
    rec["log_tail"] = tail
with open(records, "a") as f:
    f.write(json.dumps(rec) + "\n")
EOF
  return 0
}

run_step environment 30 "$PY" -c "
import torch, torchvision, platform, os
print({'torch': torch.__version__, 'torchvision': torchvision.__version__, 'python': platform.python_version(),
       'cuda': torch.cuda.is_available(), 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       'cpus': os.cpu_count()})"
if command -v nvidia-smi >/dev/null; then
  run_step nvidia_smi 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
fi

# 1. whole epochs (issue 27's first two targets): faithful against the fast combinations; GPU decoding against PIL
run_step epoch_voc 200 "$PY" bench/epoch.py --preset voc --device "$DEVICE" --no-decode-check --json "$WORK/epoch_voc.json"
if [[ "$SMOKE" != 1 ]]; then  # (the smoke run's epoch step shows every command of it starts: one preset is enough)
  run_step epoch_coco 240 "$PY" bench/epoch.py --preset coco --device "$DEVICE" --no-decode-check \
    --json "$WORK/epoch_coco.json"
fi
run_step decode 60 "$PY" bench/epoch.py --decode-only --device "$DEVICE" --json "$WORK/decode.json"

# 2. equal mAP (issue 27's third target): 3 seeds of the demo, faithful / bit-identical graphs / statistical
run_step demo_data 40 "$PY" -c "from pathlib import Path; from preproc.make_demo import ensure_demo; ensure_demo(Path('data/demo'))"
for s in "${SEEDS[@]}"; do
  run_step "seed_faithful_s$s" 60 "$PY" main.py -d demo -g "$GPU" -s "$s" ${SEED_ARGS[@]+"${SEED_ARGS[@]}"} \
    --results-dir "$WORK/seeds_faithful_s$s"
  run_step "seed_graphs_s$s" 60 "$PY" main.py -d demo -g "$GPU" -s "$s" ${SEED_ARGS[@]+"${SEED_ARGS[@]}"} \
    --image-cache ram --cuda-graphs model --results-dir "$WORK/seeds_graphs_s$s"
  run_step "seed_fast_s$s" 60 "$PY" main.py -d demo -g "$GPU" -s "$s" ${SEED_ARGS[@]+"${SEED_ARGS[@]}"} \
    --image-cache ram --cuda-graphs step --amp bf16 --channels-last --eval-batch-size 128 \
    --results-dir "$WORK/seeds_fast_s$s"
done

# 3. the training-step benchmark (docs/speed.md's table), without compile
ST_CONFIGS=faithful,off,off+cl,bf16,bf16+cl,fp16,fp16+cl
[[ "$DEVICE" == cpu ]] && ST_CONFIGS=faithful,off+cl,bf16+cl
run_step step_b16 75 "$PY" bench/step.py --arch "$ARCH" --image-size "$SIZE" --batch-size 16 --device "$DEVICE" \
  --steps "$STEPS" --warmup-steps "$WARM" --configs "$ST_CONFIGS" --json "$WORK/step_b16.json"
run_step step_b8 50 "$PY" bench/step.py --arch "$ARCH" --image-size "$SIZE" --batch-size 8 --device "$DEVICE" \
  --steps "$STEPS" --warmup-steps "$WARM" --configs "$ST_CONFIGS" --json "$WORK/step_b8.json"

# 4. the loader benchmark over real JPEGs at full-size decode cost
run_step bench_root 40 "$PY" bench/make_bench_root.py tests/data/cub/CUB_200_2011 "$WORK/cubroot" \
  --upscale "$UPSCALE" --split all-train
for w in 0 "$WORKERS"; do
  run_step "loader_w$w" 45 "$PY" bench/loader.py --data-root "$WORK/cubroot" --dataset pascal --image-size "$SIZE" \
    --num-workers "$w" --batch-size 16 --json "$WORK/loader_w$w.json"
done

# 5. short real training runs with ResNet-50: faithful against the fastest options
run_step main_faithful 80 "$PY" main.py -d demo -g "$GPU" --weights random "${DEMO_ARGS[@]}" \
  --results-dir "$WORK/runs_faithful"
run_step main_fast 70 "$PY" main.py -d demo -g "$GPU" --weights random "${DEMO_ARGS[@]}" \
  --image-cache ram --amp bf16 --channels-last --cudnn-benchmark --results-dir "$WORK/runs_fast"
run_step main_graphs 70 "$PY" main.py -d demo -g "$GPU" --weights random "${DEMO_ARGS[@]}" \
  --image-cache ram --cuda-graphs model --results-dir "$WORK/runs_graphs"

# 6. compile last: its warm-up (dynamo + inductor, forward, backward and eval graphs) is the slowest step
if [[ "$DEVICE" == cpu ]]; then
  COMPILE_ARGS=(--arch "$ARCH" --image-size 32 --batch-size 4 --steps 2 --warmup-steps 1 --configs off+compile)
else
  COMPILE_ARGS=(--arch "$ARCH" --image-size "$SIZE" --batch-size 16 --steps "$STEPS" --warmup-steps "$WARM"
                --configs bf16+cl+compile)
fi
run_step step_b16_compile 150 "$PY" bench/step.py --device "$DEVICE" "${COMPILE_ARGS[@]}" --json "$WORK/step_b16_compile.json"

# one JSON from everything
"$PY" - "$WORK" "$JSON" "$SMOKE" "$BUDGET" "$(( $(date +%s) - START ))" <<'EOF'
import json, statistics, sys
from pathlib import Path
work, out, smoke, budget, total = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", *map(int, sys.argv[4:6])
def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
def run(folder):
    runs = sorted(Path(folder).glob("*/results.json")) if Path(folder).is_dir() else []
    res = load(runs[-1]) if runs else None
    if res is None:
        return None
    epochs = res.get("epochs", {})
    return {"status": res.get("status"), "test_map": res.get("test_map"), "val_map": res.get("val_map"),
            "best_epoch": res.get("best_epoch"), "chance_test_map": res.get("chance_test_map"),
            "epoch_seconds": {k: round(v.get("seconds", 0), 2) for k, v in epochs.items()},
            "train_seconds": {k: round(v.get("train", {}).get("seconds", 0), 2) for k, v in epochs.items()},
            "config": {k: res.get("config", {}).get(k) for k in ("arch", "image_size", "batch_size", "num_workers",
                                                                  "image_cache", "amp", "channels_last", "compile",
                                                                  "cuda_graphs")},
            "error": res.get("error")}
records = [json.loads(l) for l in (work / "records.jsonl").read_text().splitlines() if l.strip()]
steps = {r["name"]: r for r in records}
result = {
    "smoke": smoke, "budget_s": budget, "total_s": total, "steps": records,
    "loader": {name: load(work / f"{name}.json") for name in steps if name.startswith("loader_w")},
    "step": {name: load(work / f"{name}.json") for name in ("step_b16", "step_b8", "step_b16_compile")},
    "main": {},
    "epoch": {name: load(work / f"epoch_{name}.json") for name in ("voc", "coco")},
    "decode": load(work / "decode.json"),
}
# issue 27's equal-mAP target: test mAP per seed of each combination, mean and sample std, and whether the graphed
# runs equal the faithful ones seed by seed
seeds = sorted({int(n.rsplit("_s", 1)[1]) for n in steps if n.startswith("seed_")})
result["seeds"] = {}
for combo in ("faithful", "graphs", "fast"):
    maps = {s: (run(work / f"seeds_{combo}_s{s}") or {}).get("test_map") for s in seeds}
    done = [m for m in maps.values() if m is not None]
    result["seeds"][combo] = {
        "test_map": maps, "wall_s": {s: steps.get(f"seed_{combo}_s{s}", {}).get("seconds") for s in seeds},
        "mean": statistics.mean(done) if done else None,
        "std": statistics.stdev(done) if len(done) > 1 else None}
f, g = result["seeds"]["faithful"]["test_map"], result["seeds"]["graphs"]["test_map"]
result["seeds"]["graphs_equal_faithful"] = {s: f[s] is not None and f[s] == g[s] for s in seeds}
for name, folder in (("faithful", "runs_faithful"), ("fast", "runs_fast"), ("graphs", "runs_graphs")):
    info = run(work / folder) or {}
    rec = steps.get(f"main_{name}", {})
    info.update(wall_s=rec.get("seconds"), step_status=rec.get("status"))
    result["main"][name] = info
out.write_text(json.dumps(result, indent=2))
print(f"[gpu.sh] wrote {out} ({total} s in all)")
for r in records:
    print(f"  {r['name']:18s} {r['status']:8s} {r['seconds']:7.1f} s")
for k in ("faithful", "graphs", "fast"):
    r = result["seeds"][k]
    print(f"  demo seeds {k:9s} test mAP {r['test_map']}, mean {r['mean']}, std {r['std']}")
m = result["main"]
for k in ("faithful", "fast", "graphs"):
    print(f"  main {k:9s} wall {m[k].get('wall_s')} s, test mAP {m[k].get('test_map')}, status {m[k].get('status')}")
EOF
