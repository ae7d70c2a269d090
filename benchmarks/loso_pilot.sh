#!/usr/bin/env bash
# Leave-one-source-out pilot (docs/results.md): train on one Zheng source, score on the other and on the
# own validation split; today's recipe and HED stain jitter 0.05 and 0.2; one seed, 20 epochs at 160 px,
# one thread. Outputs in runs/loso/. Needs the data in ../shared/datasets (or DATA=...).
set -u
cd "$(dirname "$0")/.."
D=${DATA:-../shared/datasets/wbc-zheng2018}
export OMP_NUM_THREADS=1
for src in dataset1 dataset2; do
  other=$([ "$src" = dataset1 ] && echo dataset2 || echo dataset1)
  for hed in 0 0.05 0.2; do
    name=$src-hed$hed
    out=runs/loso/$name
    [ -f "$out/best.pt" ] || .venv/bin/wbc-train --data "$D/$src" --model attention_unet --epochs 20 \
        --input-size 160 --hed "$hed" --threads 1 --seed 0 --split-seed 0 --amp bf16 --out "$out" \
        > "runs/loso/$name.log" 2>&1
    .venv/bin/wbc-evaluate "$name=$out/best.pt" --data "$D/$other" --split all --out "runs/loso/eval-$name-cross" \
        --group-by none --examples 0 --threads 1
    .venv/bin/wbc-evaluate "$name=$out/best.pt" --split val --out "runs/loso/eval-$name-in" \
        --group-by none --examples 0 --threads 1
  done
done
