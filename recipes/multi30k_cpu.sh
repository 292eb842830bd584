#!/usr/bin/env bash
# The Multi30k results in the README: each direction trained for at most 2 hours with the whole 2-core
# CPU, one after the other (two runs at once, one core each, get half the updates: English -> German
# then falls short of its target); then BLEU on test_2016_flickr of the best checkpoint (by validation
# BLEU) and of the average of the last 5 checkpoints, with beam 5.
#
#   QKV_DATA_DIR=/path/to/data recipes/multi30k_cpu.sh [RUNS_DIR]
#
# $QKV_DATA_DIR/multi30k/ holds {train,val,test_2016_flickr}.{de,en}.gz (downloaded there when missing).
set -euo pipefail
runs=${1:-runs}
mkdir -p "$runs"

for pair in en_de de_en; do
    run=$runs/multi30k_$pair
    qkv train "configs/multi30k_$pair.toml" --out "$run" >"$run.log" 2>&1
    qkv average "$run" --last 5 -o "$run/average_last5.pt"
    for model in "$run" "$run/average_last5.pt"; do
        echo "== $model"
        qkv evaluate "$model" --dataset multi30k --split test_2016_flickr --beam 5
    done
done
