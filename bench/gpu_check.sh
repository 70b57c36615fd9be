#!/usr/bin/env bash
# The GPU check: on a CUDA machine where the project is installed (`pip install -e '.[dali]'`, or its
# packages on PYTHONPATH), run the GPU-construction dry run, the GPU tests and the two GPU benchmarks,
# and write their tables to one folder, printing the summary last. At most 7.8 minutes: the sum of
# the stages' time limits (90 + 120 + 190 + 65 s; the dry run's are longer, for a slow CPU).
#
#   bash bench/gpu_check.sh                 # results in gpu_check/<host>-<date>/
#   bash bench/gpu_check.sh --out DIR       # results in DIR
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# Without CUDA it is a dry run: every stage, with tiny sizes, on the CPU (tests/test_gpu_check.py
# runs it), so that the script itself cannot rot between GPU runs.
#
# Stages, each under its own time limit; a failing stage is noted and the next one runs:
#   construction  tests/test_gpu_construction.py (every GPU object built on the CPU)
#   gpu tests     tests/test_gpu.py (pytest -m gpu; skipped, with the reason, without CUDA)
#   throughput    bench/gpu_throughput.py (ResNet-50 img/s per data source and precision)
#   loop          bench/loop_overhead.py (our Lightning fit against a plain PyTorch loop)
# DIR receives summary.md (every table), gpu_check.log, pytest_construction.txt, pytest_gpu.txt,
# gpu_throughput.{md,json} and loop_overhead.{md,json}.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT=""
while [ $# -gt 0 ]; do
    case $1 in
        --out) OUT=${2:?--out needs a folder}; shift 2 ;;
        --out=*) OUT=${1#--out=}; shift ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x "$REPO/.venv/bin/python" ] && PYTHON=$REPO/.venv/bin/python
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# W&B is not what is measured here; warnings would bury the tables.
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore WANDB_MODE=disabled

DRY=""
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    DRY=1
fi
OUT=${OUT:-gpu_check/$(hostname -s 2>/dev/null || echo host)-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.md
: > "$SUMMARY"
exec 3>&1 4>&2
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
STARTED=$(date +%s)
STATUS=()
say() { echo "$*" | tee -a "$SUMMARY"; }
stage() {  # stage NAME LIMIT_S COMMAND...: runs it, notes its status and time for the summary
    local name=$1 limit=$2 t0 rc
    shift 2
    echo
    echo "=== $name (at most ${limit} s) ==="
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    case $rc in
        0) STATUS+=("| $name | ok | $took s |") ;;
        124|137) STATUS+=("| $name | TIMED OUT after $limit s | $took s |") ;;
        *) STATUS+=("| $name | exit $rc | $took s |") ;;
    esac
    return 0
}
pytest_stage() {  # pytest_stage NAME LIMIT_S FILE REPORT [pytest args...]
    local name=$1 limit=$2 file=$3 report=$4
    shift 4
    stage "$name" "$limit" bash -c '"$0" -m pytest "$1" -q -rs -p no:cacheprovider "${@:3}" > "$2" 2>&1; rc=$?; cat "$2"; exit $rc' \
        "$PYTHON" "$file" "$OUT/$report" "$@"
    say "$name: $(grep -E '(passed|failed|skipped|error)' "$OUT/$report" 2>/dev/null | tail -1)"
}

say "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')${DRY:+ (dry run: no CUDA here, tiny sizes on the CPU)}"
say
[ -f "$OUT/install.txt" ] && { say "$(cat "$OUT/install.txt")"; say; }

echo "=== environment ==="
{
    echo '```'
    if command -v nvidia-smi >/dev/null && [ -z "$DRY" ]; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | head -3
    fi
    "$PYTHON" - <<'EOF' 2>&1
import os, platform, torch
parts = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"]
for name in ("pytorch_lightning", "torchmetrics", "nvidia.dali", "omegaconf"):
    try:
        module = __import__(name, fromlist=["__version__"])
        parts.append(f"{name} {module.__version__}")
    except Exception as err:  # noqa: BLE001 - a missing package is reported, not fatal
        parts.append(f"{name}: NOT importable ({type(err).__name__})")
parts.append(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
print(", ".join(parts) + f"; {os.cpu_count()} CPUs")
EOF
    echo '```'
} | tee -a "$SUMMARY"
say

pytest_stage "construction (tests/test_gpu_construction.py)" 90 tests/test_gpu_construction.py pytest_construction.txt
pytest_stage "GPU tests (tests/test_gpu.py -m gpu)" 120 tests/test_gpu.py pytest_gpu.txt -m gpu
say

if [ -n "$DRY" ]; then
    stage "gpu_throughput" 150 "$PYTHON" bench/gpu_throughput.py --device cpu --arch resnet20 --batch 4 --steps 2 \
        --repeats 2 --warmup 1 --image-size 32 --threads 1 --rows dali-alone,synthetic,dali,lightning \
        --out "$OUT/gpu_throughput"
else
    stage "gpu_throughput" 190 "$PYTHON" bench/gpu_throughput.py --budget-s 140 --out "$OUT/gpu_throughput"
fi
say "## Training throughput (bench/gpu_throughput.py)"
say
if [ -f "$OUT/gpu_throughput.md" ]; then cat "$OUT/gpu_throughput.md" >> "$SUMMARY"; else say "no table: see gpu_check.log"; fi
say

if [ -n "$DRY" ]; then
    stage "loop_overhead" 120 "$PYTHON" bench/loop_overhead.py --arch resnet20 --batch 4 --image-size 32 --steps 2 \
        --warmup 1 --rounds 1 --threads 1 --out "$OUT/loop_overhead"
else
    stage "loop_overhead" 65 "$PYTHON" bench/loop_overhead.py --steps 25 --warmup 8 --rounds 2 --out "$OUT/loop_overhead"
fi
say "## Lightning against a plain loop (bench/loop_overhead.py)"
say
if [ -f "$OUT/loop_overhead.md" ]; then cat "$OUT/loop_overhead.md" >> "$SUMMARY"; else say "no table: see gpu_check.log"; fi
say

say "## Stages"
say
say "| stage | status | time |"
say "|---|---|---|"
for line in "${STATUS[@]}"; do say "$line"; done
say
say "total $(( $(date +%s) - STARTED )) s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exec 1>&3 2>&4
wait "$TEE_PID" 2>/dev/null  # the log is complete before the summary is printed
echo
echo "================================ summary ================================"
cat "$SUMMARY"
failed=0
for line in "${STATUS[@]}"; do case $line in *"| ok |"*) ;; *) failed=1 ;; esac; done
exit $failed
