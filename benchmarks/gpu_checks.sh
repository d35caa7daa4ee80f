#!/usr/bin/env bash
# The GPU checks of a session, as one prepared run on a CUDA machine (an H200 here).
#
# Runs in the repository root with the machine's own python3 (torch with CUDA, einops,
# tensorboard, scikit-learn); selfref is used from the checkout through PYTHONPATH.
#   1. CUDA tests: the tests marked `cuda` (RMAD bit-exact reversal and hypergradients on the
#      GPU, fixed-point arithmetic, SRWM and learned-optimizer device paths).
#   2. rmad_speed on CUDA and, beside it, on one CPU thread of the same host.
#   2b. The lopt preset's meta-training speed on the device and on the host's CPU.
#   3. In-context learners on fewshot-digits (benchmarks/incontext.py), one process per
#      learner, all at once, each capped at IC_SECONDS of training.
# Everything lands in $OUT/results.tgz (benchmark JSONs and logs) and $OUT/summary.txt.
#
# Usage (device): OUT=/some/dir IC_SECONDS=240 [IC_BATCH=512] [IC_MIXTURE_STEPS=N] [SET=all|learners] bash benchmarks/gpu_checks.sh
#   IC_MIXTURE_STEPS: end the min_ways mixture at that step (all-way sequences after it;
#   pick it below the steps IC_SECONDS allows: ~10 steps/s for srwm_ts d128 at batch 512).
#   IC_INIT: a folder like results.tgz's weights/ from an earlier call (carried to the device):
#   each learner starts from weights/<name>/<model>.pt (a warm start: new Adam state and lr).
# Dry run here:   DEVICE=cpu QUICK=1 IC_SECONDS=5 PATH=.venv/bin:$PATH bash benchmarks/gpu_checks.sh
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # deterministic cuBLAS (RMAD)
OUT=${OUT:-/tmp/selfref_gpu}
IC=${IC_SECONDS:-240}
DEV=${DEVICE:-cuda}  # DEVICE=cpu QUICK=1: a dry run of the script itself on a CPU machine
Q=(); [ "${QUICK:-0}" = 1 ] && Q=(--quick)
W=$(mktemp -d)
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  nproc
} > "$W/env.txt" 2>&1

# 1. CUDA tests, 2. RMAD speed (first, alone on the GPU, so its timings are clean;
#    SET=learners skips the RMAD timings and runs only the four main learners)
SET=${SET:-all}
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_exact.py tests/test_rmad.py tests/test_train.py tests/test_cli.py > "$W/cuda_tests.log" 2>&1
echo "cuda tests exit $?" >> "$W/cuda_tests.log"
[ "$SET" = all ] && timeout 90 python3 -m benchmarks.rmad_speed --device "$DEV" "${Q[@]}" --out "$W/rmad_speed.cuda.json" \
  > "$W/rmad_speed_cuda.log" 2>&1
[ "$SET" = all ] && timeout 90 python3 -m benchmarks.rmad_speed --device cpu "${Q[@]}" --threads 1 --out "$W/rmad_speed.cpu_gpuhost.json" \
  > "$W/rmad_speed_cpu.log" 2>&1

# 2b. the shipped learned optimizer's preset (selfref meta-train --preset lopt): 100 meta-steps
#     on the device and on one CPU thread of the host, a tiny meta-validation; wall_s of each
lopt_speed() {  # device
  printf '[problem]\neval_tasks = 1\neval_instances = 1\neval_steps = 20\n' > "$W/lopt_small.toml"
  OMP_NUM_THREADS=1 timeout 240 python3 -m selfref meta-train --preset lopt --config "$W/lopt_small.toml" \
    --meta-steps "${LOPT_STEPS:-100}" --device "$1" --logdir "$W/lopt_$1" > "$W/lopt_$1.log" 2>&1
  python3 -c "import json,glob,sys; r=json.load(open(glob.glob(sys.argv[1])[0])); print(sys.argv[2], 'lopt meta-train', r['steps_done'], 'steps', round(r['wall_s'], 1), 's')" \
    "$W/lopt_$1/meta-train/*/results.json" "$1" >> "$W/lopt_speed.txt" 2>&1
}
[ "$SET" = all ] && { lopt_speed "$DEV"; [ "$DEV" = cpu ] || lopt_speed cpu; }

# 3. in-context learners, all at once
common=(--device "$DEV" "${Q[@]}" --steps 1000000 --max-train-s "$IC" --min-ways 2 --lr-schedule cosine
        --eval-every 500 --batch "${IC_BATCH:-512}" --length 21 --threads 2
        ${IC_MIXTURE_STEPS:+--min-ways-steps "$IC_MIXTURE_STEPS"})
ic() {  # name, then benchmark options
  local name=$1; shift
  timeout $((IC + 60)) python3 -m benchmarks.incontext "${common[@]}" "$@" --save-dir "$W/weights/$name" \
    ${IC_INIT:+--init-dir "$IC_INIT/$name"} --out "$W/incontext.cuda.$name.json" \
    > "$W/ic_$name.log" 2>&1 &
}
ic srwm_ts_d128h2 --models srwm_ts --srwm-dim 128 --srwm-heads 2 --lr 2e-3
if [ "$SET" = all ]; then
  ic srwm_ts_d64h2 --models srwm_ts --srwm-dim 64 --srwm-heads 2 --lr 3e-3
  ic srwm_ts_d128h4 --models srwm_ts --srwm-dim 128 --srwm-heads 4 --lr 2e-3
fi
ic srwm_d128h2 --models srwm --srwm-dim 128 --srwm-heads 2 --lr 2e-3
ic lstm --models lstm --lstm-dim 128 --lr 3e-3
ic hyperlstm --models hyperlstm --hyper-dim 112 --hyper-hidden 32 --lr 3e-3

wait

{
  cat "$W/env.txt"
  tail -n 3 "$W/cuda_tests.log"
  cat "$W/lopt_speed.txt" 2>/dev/null
  python3 - "$W" <<'EOF'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.load(open(f))
    m = d["metrics"]
    keep = {k: v for k, v in m.items() if "acc@" in k or "steps_done" in k or "over" in k
            or k.endswith("_s") and "internal" not in k}
    print(f.name, json.dumps(keep))
    for k, t in d.get("targets", {}).items():
        print("  target", k, t)
EOF
  for f in "$W"/ic_*.log; do echo "== $f"; tail -n 2 "$f"; done
} > "$OUT/summary.txt" 2>&1
tar czf "$OUT/results.tgz" -C "$W" .
cat "$OUT/summary.txt"
