#!/usr/bin/env bash
# Issue 8 on ResNet-20 alpha / Fashion-MNIST (fine classes): the original, the `exchange` defense and the
# paper's WGAN defense, trained the same way, scored on the test set, then audited by `cvconvert attack`.
#
#     experiments/resnet20_defense.sh OUT [EPOCHS] [DEVICE] [VARIANTS]
#     CVCONVERT="python -m cli" experiments/resnet20_defense.sh /tmp/r8 3 cuda "original exchange paper"
#
# TRAIN_EXTRA / ATTACK_EXTRA add options (e.g. "--max-steps 3", "--train-size 256") for a smoke run.
# OUT/train-V.json, eval-V.json, audit-V/report.{json,md} per variant; OUT/done-V once V is finished.
set -u
OUT=${1:?usage: resnet20_defense.sh OUT [EPOCHS] [DEVICE] [VARIANTS]}
EPOCHS=${2:-3}
DEV=${3:-cuda}
VARIANTS=${4:-original exchange paper}
C=${CVCONVERT:-cvconvert}
T="--data fashion-mnist --task fine --epochs $EPOCHS --batch-size 128 --lr 1e-3 --seed 0 --device $DEV --workers ${WORKERS:-4} ${TRAIN_EXTRA:-}"
mkdir -p "$OUT"
run() { echo "== $(date +%T) $*" >&2; "$@"; echo "== $(date +%T) rc=$?" >&2; }
for v in $VARIANTS; do
  variant=complex
  extra="--defense $v"
  if [ "$v" = original ]; then variant=original; extra=""; fi
  run $C convert resnet20 --split alpha --data fashion-mnist --task fine --variant $variant -o "$OUT/r20-$v" --force
  run $C train "$OUT/r20-$v" $T $extra --json > "$OUT/train-$v.json"
  run $C eval "$OUT/r20-$v" --data fashion-mnist --device "$DEV" --json > "$OUT/eval-$v.json"
  if [ "$v" != original ]; then
    run $C attack "$OUT/r20-$v" --data fashion-mnist --task fine --baseline "$OUT/r20-original" --budget quick \
      --device "$DEV" -o "$OUT/audit-$v" ${ATTACK_EXTRA:-}
  fi
  touch "$OUT/done-$v"
done
