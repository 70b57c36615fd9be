#!/usr/bin/env bash
# The CIFAR-style degradation study reported in bench/RESULTS.md (He et al. 2015, Figure 6 setting:
# plain20/plain56 vs resnet20/resnet56, recipe conf/experiment/degradation_cifar.yaml), on the CPU
# within a 30 CPU-minute budget, on generated shapes data (10 classes x 400 train / 100 val, 40x40).
#
#   bash bench/degradation_study.sh            # ~25 CPU-minutes; prints the table and CPU time
#
# It is `imagenet-trainer study degradation` with the four nets started at once (one per
# process, one thread each) instead of one after another, so that a shared 2-core box finishes it
# in less wall time; the nets, recipe, seed and data are the same either way. The one-process
# equivalent is:
#   imagenet-trainer study degradation data.root=$DATA run.dir=$RUN trainer.max_epochs=10 'optim.milestones=[5,7]' \
#       data.backend=torchvision data.num_workers=0 trainer.accelerator=cpu logger.wandb.mode=disabled
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-runs/bench/shapes10x400_40px}
RUN=${RUN:-runs/bench/degradation_cifar}
EPOCHS=${EPOCHS:-10}
ARCHS=${ARCHS:-plain20 plain56 resnet20 resnet56}

[ -d "$DATA/train" ] || "$PY" -m trainer sample-data "$DATA" --classes 10 --train-per-class 400 \
    --val-per-class 100 --size 40x40 --seed 0
mkdir -p "$RUN"
# The recipe's lr steps (at half and three quarters of the paper's 164 epochs) move with the epochs.
COMMON=(data.root="$DATA" run.dir="$RUN" trainer.max_epochs="$EPOCHS" "optim.milestones=[$((EPOCHS / 2)),$((EPOCHS * 3 / 4))]" data.backend=torchvision
        data.num_workers=0 trainer.accelerator=cpu logger.wandb.mode=disabled)
start=$(date +%s)
pids=()
for arch in $ARCHS; do
    # /usr/bin/time: user+sys CPU seconds of the whole process tree, an independent check of the
    # study's own count (RUN/<arch>/study_cpu.json).
    OMP_NUM_THREADS=1 /usr/bin/time -f "$arch %U %S %e" -o "$RUN/time-$arch.txt" \
        "$PY" -m trainer study degradation --archs "$arch" "${COMMON[@]}" > "$RUN/log-$arch.txt" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$PY" -m trainer study degradation --plot-only "$RUN"
cp "$RUN/study.png" bench/degradation_cifar.png

echo
echo "| arch | user+sys CPU-min | wall-min |"
echo "|---|---:|---:|"
awk '{ cpu += $2 + $3; printf "| %s | %.1f | %.1f |\n", $1, ($2 + $3) / 60, $4 / 60 } END { printf "| all | %.1f |  |\n", cpu / 60 }' \
    "$RUN"/time-*.txt
echo "wall time of the whole study: $(( ($(date +%s) - start) / 60 )) min; table: $RUN/study.md; figure: bench/degradation_cifar.png"
