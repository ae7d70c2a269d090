#!/usr/bin/env bash
# Leave-one-source-out study (docs/results.md): train on one Zheng source, score on every image of the
# other and on the own source's validation split. Recipes: a = today's, b = HED stain jitter σ 0.2,
# c = Reinhard stain normalisation (reference: the training images), d = b and c, e = c with the scale
# augmentation of the per-cell windows (--window-scale). 20 epochs at 160 px,
# attention U-Net, one thread a run, JOBS runs at once. Outputs in runs/loso/<source>-<recipe>-s<seed>.
# MODELS="attention_unet unet" adds plain U-Net runs (<source>-<recipe>-unet-s<seed>).
# Usage: SEEDS="0 1" RECIPES="a b c d" MODELS=attention_unet JOBS=2 bash benchmarks/loso_study.sh
# Then: .venv/bin/python benchmarks/loso_table.py runs/loso
set -u
cd "$(dirname "$0")/.."
export D=${DATA:-../shared/datasets/wbc-zheng2018}
export OMP_NUM_THREADS=1
mkdir -p runs/loso

one() {  # one() SOURCE RECIPE SEED MODEL
  local src=$1 recipe=$2 seed=$3 model=$4 other flags
  other=$([ "$src" = dataset1 ] && echo dataset2 || echo dataset1)
  case $recipe in
    a) flags="" ;;
    b) flags="--hed 0.2" ;;
    c) flags="--stain-norm" ;;
    d) flags="--hed 0.2 --stain-norm" ;;
    e) flags="--stain-norm --window-scale" ;;
  esac
  local name=$src-$recipe-s$seed
  [ "$model" = attention_unet ] || name=$src-$recipe-$model-s$seed
  local out=runs/loso/$name
  # shellcheck disable=SC2086
  [ -f "$out/best.pt" ] || .venv/bin/wbc-train --data "$D/$src" --model "$model" --epochs 20 \
      --input-size 160 $flags --threads 1 --seed "$seed" --split-seed 0 --amp bf16 --out "$out" \
      > "$out.log" 2>&1
  [ -f "$out-cross/report.json" ] || .venv/bin/wbc-evaluate "$name=$out/best.pt" --data "$D/$other" \
      --split all --out "$out-cross" --group-by none --examples 0 --threads 1 > "$out-cross.txt" 2>&1
  [ -f "$out-in/report.json" ] || .venv/bin/wbc-evaluate "$name=$out/best.pt" --split val --out "$out-in" \
      --group-by none --examples 0 --threads 1 > "$out-in.txt" 2>&1
  echo "done $name"
}
export -f one

for seed in ${SEEDS:-0 1 2}; do
  for model in ${MODELS:-attention_unet}; do
    for recipe in ${RECIPES:-a b c d}; do
      for src in dataset1 dataset2; do echo "$src $recipe $seed $model"; done
    done
  done
done | xargs -P "${JOBS:-2}" -L 1 bash -c 'one $0 $1 $2 $3'
