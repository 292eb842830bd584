#!/usr/bin/env bash
# The Multi30k result in the README: both directions trained at once on a 2-core CPU, one core each, for
# at most 2 hours each; then BLEU on test_2016_flickr of the best checkpoint (by validation BLEU) and of
# the average of the last 5 checkpoints, with beam 5.
#
#   QKV_DATA_DIR=/path/to/data recipes/multi30k_cpu.sh [RUNS_DIR]
#
# $QKV_DATA_DIR/multi30k/ holds {train,val,test_2016_flickr}.{de,en}.gz (downloaded there when missing).
set -euo pipefail
runs=${1:-runs}
mkdir -p "$runs"

for pair in en_de de_en; do
    OMP_NUM_THREADS=1 qkv train "configs/multi30k_$pair.toml" --out "$runs/multi30k_$pair" \
        --set train.threads=1 >"$runs/multi30k_$pair.log" 2>&1 &
done
wait

for pair in en_de de_en; do
    run=$runs/multi30k_$pair
    qkv average "$run" --last 5 -o "$run/average_last5.pt"
    for model in "$run" "$run/average_last5.pt"; do
        echo "== $model"
        qkv evaluate "$model" --dataset multi30k --split test_2016_flickr --beam 5 --threads 2
    done
done
