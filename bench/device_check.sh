#!/usr/bin/env bash
# The GPU check, in one go on a lent GPU machine (README, "GPU speed"): install what the machine
# lacks from carried wheels, run the GPU tests and the two benchmarks, write their tables to $OUT.
#
#   bash bench/device_check.sh stash                # keep this call's carried parts for a later call
#   bash bench/device_check.sh                      # the check: about 6 minutes, at most 8, on an H100
#   DEVICE_CHECK_DRY=1 bash bench/device_check.sh   # here, without a GPU: every stage, tiny, on the CPU
#
# Wheels: bench/fetch_device_wheels.sh (run here first) puts omegaconf and DALI's small dependencies
# in .devwheels/small/ and cuts the DALI bundle into .devwheels/parts/*.partNN, one part per call
# (64 MiB a call). Calls that carry only a part run `stash`, which copies it to $STASH (/tmp: it
# lives as long as the machine, which is given back 30 s after a call); the last call carries the
# last part and .devwheels/small and runs the check, which joins the parts, checks them against
# small/MANIFEST.sha256 and installs with `pip install --no-index --no-deps --target`. Without DALI
# (parts missing or broken) the check still runs everything else and says so in the summary.
#
# Stages (each under its own timeout; a failing stage is noted and the next one runs):
#   install, environment, GPU tests (pytest -m gpu), bench/gpu_throughput.py, bench/loop_overhead.py
# $OUT receives (8 files at most come back): summary.md (all the tables), device_check.log,
# pytest.txt, gpu_throughput.{md,json}, loop_overhead.{md,json}. The summary is printed last.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
WHEELS=$REPO/.devwheels
STASH=${DEVICE_STASH:-/tmp/devwheels}
SITE=${DEVICE_SITE:-/tmp/device_site}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if [ -n "${DEVICE_CHECK_DRY:-}" ] && [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; fi
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore WANDB_MODE=disabled

stash_parts() {
    mkdir -p "$STASH"
    local n=0 f
    for f in "$WHEELS"/parts/*.part*; do
        [ -f "$f" ] || continue
        cp -f "$f" "$STASH/" && n=$((n + 1))
    done
    if [ -f "$WHEELS/small/MANIFEST.sha256" ]; then cp -f "$WHEELS/small/MANIFEST.sha256" "$STASH/"; fi
    echo "stash: $n part(s) came with this call; $STASH holds: $(cd "$STASH" && ls | tr '\n' ' ')"
}

if [ "${1:-}" = stash ]; then
    stash_parts
    exit 0
fi

# --- where results go ------------------------------------------------------------------------------
DRY=${DEVICE_CHECK_DRY:-}
if [ -z "$DRY" ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    DRY=1
    echo "no CUDA device here: a dry run (tiny sizes, CPU)"
fi
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d /tmp/device_check.XXXXXX)
fi
mkdir -p "$OUT"
exec 3>&1 4>&2
exec > >(tee -a "$OUT/device_check.log") 2>&1
TEE_PID=$!
SUMMARY=$OUT/summary.md
STARTED=$(date +%s)
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
stage() {  # stage NAME TIMEOUT_S COMMAND...: runs it, notes its status and time in the summary
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
STATUS=()
say "# Device check, $(date -u '+%Y-%m-%d %H:%M UTC')${DRY:+ (dry run: no GPU, tiny sizes)}"
say

# --- 1. install what the machine lacks ------------------------------------------------------------
DALI_NOTE="DALI: the image's own (nothing carried)"
install_wheels() {
    stash_parts
    local manifest=$STASH/MANIFEST.sha256 wheels=() missing=() name whole
    if [ -f "$manifest" ]; then
        while read -r _ name; do
            case $name in whole:*) continue ;; esac
            [ -f "$STASH/$name" ] || missing+=("$name")
        done < "$manifest"
        whole=$(sed -n 's/.*  whole://p' "$manifest")
        if [ ${#missing[@]} -gt 0 ]; then
            DALI_NOTE="DALI: NOT installed, parts missing: ${missing[*]} (the machine was given back between the calls?)"
        elif ! (cd "$STASH" && grep -v '  whole:' MANIFEST.sha256 | sha256sum -c --quiet -); then
            DALI_NOTE="DALI: NOT installed, a part does not match MANIFEST.sha256"
        else
            rm -rf "$STASH/wheels" && mkdir -p "$STASH/wheels"
            cat "$STASH/$whole".part* | tar -x -C "$STASH/wheels"
            local unpacked=$?  # the whole pipeline's (pipefail)
            if [ "$unpacked" != 0 ] || ! ls "$STASH"/wheels/*.whl >/dev/null 2>&1; then
                DALI_NOTE="DALI: NOT installed, the joined bundle did not unpack"
            else
                wheels+=("$STASH"/wheels/*.whl)
                DALI_NOTE="DALI: installed from $(ls "$STASH"/wheels | wc -l) carried wheels"
            fi
        fi
    fi
    if ls "$WHEELS"/small/*.whl >/dev/null 2>&1; then wheels+=("$WHEELS"/small/*.whl); fi
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "no wheels carried: nothing to install"
        return 0
    fi
    rm -rf "$SITE"
    local cross=()
    if [ -n "$DRY" ]; then  # here: install the machine's CPython 3.12 wheels just to check them
        cross=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
               --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux2014_x86_64)
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${cross[@]}" "${wheels[@]}" \
        || { DALI_NOTE="$DALI_NOTE; pip install FAILED"; return 1; }
    # nvidia/ must stay a namespace package, so that nvidia.dali sits beside the image's nvidia.*.
    rm -f "$SITE/nvidia/__init__.py"
}

if [ -n "$DRY" ] && [ -z "${DEVICE_CHECK_INSTALL:-}" ]; then
    DALI_NOTE="DALI: this machine's own (dry run: installing skipped; DEVICE_CHECK_INSTALL=1 checks it)"
    STATUS+=("| install | skipped (dry run) | 0 s |")
else
    t0=$(date +%s)
    echo "=== install ==="
    if install_wheels; then STATUS+=("| install | ok | $(( $(date +%s) - t0 )) s |"); else STATUS+=("| install | FAILED | $(( $(date +%s) - t0 )) s |"); fi
    if [ -d "$SITE" ] && [ -z "$DRY" ]; then
        # Only on the machine: here, CPython 3.12 builds would shadow this venv's own packages.
        export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
        export LD_LIBRARY_PATH="$SITE/nvidia/cu13/lib:$SITE/nvidia/libnvcomp/lib64:$SITE/nvidia/nvimgcodec${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        if ! "$PYTHON" -c 'import nvidia.dali.plugin.pytorch' 2>/dev/null && ls "$STASH"/wheels/*.whl >/dev/null 2>&1; then
            # The image's nvidia/ is a regular package (it has an __init__.py) and hides ours: install
            # DALI into the interpreter's own site-packages instead.
            echo "nvidia.dali does not import from $SITE; installing the DALI wheels into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$STASH"/wheels/*.whl \
                && DALI_NOTE="$DALI_NOTE (into the interpreter's site-packages)"
        fi
    fi
fi
export PYTHONPATH="${PYTHONPATH:-$REPO}"
if "$PYTHON" -c 'import nvidia.dali.plugin.pytorch' 2>/dev/null; then
    DALI_NOTE="$DALI_NOTE; imports: yes, $("$PYTHON" -c 'import nvidia.dali as d; print(d.__version__)' 2>/dev/null)"
else
    DALI_NOTE="$DALI_NOTE; imports: NO ($("$PYTHON" -c 'import nvidia.dali.plugin.pytorch' 2>&1 | tail -1 | cut -c1-200)): DALI rows are skipped"
fi
"$PYTHON" -c 'import omegaconf' 2>/dev/null || DALI_NOTE="$DALI_NOTE. omegaconf does NOT import: the Lightning rows and fit tests fail"
say "$DALI_NOTE"
say

# --- 2. the environment -----------------------------------------------------------------------------
echo "=== environment ==="
{
    echo '```'
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
            --format=csv 2>&1 | head -3
    fi
    "$PYTHON" - <<'EOF' 2>&1
import os, platform, torch
try:
    import pytorch_lightning as pl, torchmetrics
    extra = f"lightning {pl.__version__}, torchmetrics {torchmetrics.__version__}"
except Exception as err:  # noqa: BLE001
    extra = f"lightning: {err!r}"
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}), {extra}; {dev}; {os.cpu_count()} CPUs")
EOF
    echo '```'
} | tee -a "$SUMMARY"
say

# --- 3. GPU tests -------------------------------------------------------------------------------------
stage "GPU tests (pytest -m gpu)" 90 \
    bash -c "'$PYTHON' -m pytest tests/test_gpu.py -m gpu -q -rs -p no:cacheprovider > '$OUT/pytest.txt' 2>&1; rc=\$?; cat '$OUT/pytest.txt'; exit \$rc"
say "GPU tests: $(grep -E '(passed|failed|skipped|error)' "$OUT/pytest.txt" 2>/dev/null | tail -1)"
say

# --- 4. training throughput ---------------------------------------------------------------------------
if [ -n "$DRY" ]; then
    stage "gpu_throughput" 120 "$PYTHON" bench/gpu_throughput.py --device cpu --arch resnet20 --batch 4 --steps 2 \
        --repeats 2 --warmup 1 --image-size 32 --threads 1 --rows dali-alone,synthetic,dali,lightning \
        --out "$OUT/gpu_throughput"
else
    stage "gpu_throughput" 290 "$PYTHON" bench/gpu_throughput.py --budget-s 220 --out "$OUT/gpu_throughput"
fi
say "## Training throughput (bench/gpu_throughput.py)"
say
if [ -f "$OUT/gpu_throughput.md" ]; then cat "$OUT/gpu_throughput.md" >> "$SUMMARY"; else say "no table: see device_check.log"; fi
say

# --- 5. Lightning against a plain loop ----------------------------------------------------------------
if [ -n "$DRY" ]; then
    stage "loop_overhead" 90 "$PYTHON" bench/loop_overhead.py --arch resnet20 --batch 4 --image-size 32 --steps 2 \
        --warmup 1 --rounds 1 --threads 1 --out "$OUT/loop_overhead"
else
    stage "loop_overhead" 65 "$PYTHON" bench/loop_overhead.py --steps 25 --warmup 8 --rounds 2 --out "$OUT/loop_overhead"
fi
say "## Lightning against a plain loop (bench/loop_overhead.py)"
say
if [ -f "$OUT/loop_overhead.md" ]; then cat "$OUT/loop_overhead.md" >> "$SUMMARY"; else say "no table: see device_check.log"; fi
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
