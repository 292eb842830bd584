#!/usr/bin/env bash
# Everything qkv checks on a GPU, in the order that gives the most for the least GPU time: the CUDA tests,
# both benchmarks on the GPU, then the English -> German recipe trained for a few minutes and scored.
# The figures in README ("On a GPU") and benchmarks/README.md came from these commands on one H100.
#
#   QKV_DATA_DIR=/path/to/data recipes/gpu_checks.sh [OUT_DIR] [TRAIN_HOURS]
#   PARTS="tests benchmarks" recipes/gpu_checks.sh out     # then PARTS=train: ~6 and ~9 minutes
#   PARTS=graphs recipes/gpu_checks.sh out     # only the decoder step as CUDA graphs (issue 18)
#
# OUT_DIR (default gpu_checks/) gets one log per step and the training run; TRAIN_HOURS (default 0.09,
# about 5 minutes) bounds the training. PARTS (default "graphs tests benchmarks train") picks what runs, for
# machines that limit the length of one command. Without transformers the decoding benchmark times qkv
# alone. Runs from the repository root, with or without qkv installed.
set -uo pipefail
out=${1:-gpu_checks}
hours=${2:-0.09}
parts=" ${PARTS:-graphs tests benchmarks train} "
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: run it, keep its output in OUT_DIR/NAME.log, go on if it fails
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"

if [[ $parts == *" graphs "* ]]; then
    # `--compile` on a GPU: the static decoder step replayed as CUDA graphs, against the eager step
    # and Hugging Face's generate over its static cache, compiled with CUDA graphs (tokens/s: x 20).
    step test_cuda_graphs python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        tests/test_cuda_graphs.py -k "graph or compile"
    # Batch 1 (the issue's cells) first, with no compile of Hugging Face's in it; then against
    # its static cache, whose compile per cell takes a while (and could fail alone).
    step decode_graphs python3 benchmarks/decode_speed.py --device cuda \
        --systems qkv qkv-compiled --batches 1 32 --repeats 7
    if python3 -c "import transformers" 2>/dev/null; then
        step decode_graphs_hf_static python3 benchmarks/decode_speed.py --device cuda \
            --systems qkv-compiled hf hf-static --batches 1 --repeats 7
    fi
fi

if [[ $parts == *" tests "* ]]; then
    step test_cuda python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi

if [[ $parts == *" benchmarks "* ]]; then
    step train_throughput python3 benchmarks/train_throughput.py --device cuda --sentences 768 \
        --repeats 10 --warmup 3
    step train_throughput_compiled python3 benchmarks/train_throughput.py --device cuda \
        --sentences 768 --repeats 10 --warmup 3 --compile --precisions bf16
    systems="qkv qkv-bf16 qkv-nocache"
    python3 -c "import transformers" 2>/dev/null && systems="$systems hf hf-bf16"
    # shellcheck disable=SC2086
    step decode_speed python3 benchmarks/decode_speed.py --device cuda --systems $systems \
        --batches 32 1 128 --repeats 7
fi

if [[ $parts == *" train "* ]]; then
    run=$out/multi30k_en_de
    step train python3 -m qkv train configs/multi30k_en_de.toml --out "$run" \
        --set "train.device='cuda'" --set train.pad_multiple=8 --set "train.max_hours=$hours"
    step average python3 -m qkv average "$run" --last 5 -o "$run/average_last5.pt"
    for model in "$run/average_last5.pt" "$run"; do
        step "evaluate_$(basename "$model" .pt)" python3 -m qkv evaluate "$model" \
            --dataset multi30k --split test_2016_flickr --beam 5 --device cuda --quiet
    done
fi
