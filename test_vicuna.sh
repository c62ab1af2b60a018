#!/usr/bin/env bash
# Prune Vicuna-13B to 50% sparsity and quantize it with MI-grouped mixed precision
# (average 4.0 bits per weight over 10 channel clusters per linear), then evaluate perplexity.
#
#   bash test_vicuna.sh                                  # the defaults below
#   MODEL=meta-llama/Llama-2-7b-hf TARGET=3.5 NGROUPS=15 SPARSITY=0 bash test_vicuna.sh
#   BUDGET=stored TARGET=3.16 SPARSITY=0 bash test_vicuna.sh   # everything the packed file holds <= 3.16 bits
#   bash test_vicuna.sh --eval wikitext2 --fwd_batch 1   # extra arguments go to vicuna_mi.py
#   bash test_vicuna.sh --resume                         # continue an interrupted run (same settings)
#
# Every setting can be overridden from the environment, as in the second line. SAVE follows the
# settings, so rerunning with the same ones and --resume picks up the checkpoints in $SAVE.work.
set -euo pipefail

# Which GPUs to use. The tool spreads every layer's work over all GPUs it sees (numbered from
# cuda:0) and reads the model's layers from disk one at a time (safetensors checkpoints; add
# --max_gpu_memory GIB for a small card). Unset, it uses every GPU of the machine
# (or DEFAULT_GPUS at the top of vicuna_mi.py); pick free ones from `nvidia-smi`, e.g.
# CUDA_VISIBLE_DEVICES=2,3 bash test_vicuna.sh

MODEL=${MODEL:-lmsys/vicuna-13b-v1.5}   # hub id, local model folder, or .gguf file
DATASET=${DATASET:-c4}                  # calibration: wikitext2, ptb, c4, or a local .txt/.jsonl

SPARSITY=${SPARSITY:-0.5}     # unstructured sparsity per output row (0 = quantize only)
WBITS=${WBITS:-4}             # below 16 switches quantization on; MI mode takes widths from TARGET
TARGET=${TARGET:-4.0}         # average bits per weight of every linear (MI mode)
BUDGET=${BUDGET:-weight}      # what TARGET bounds: weight bits, or everything the packed file stores
MI=${MI:-1}                   # 1: MI-grouped mixed precision; 0: uniform SparseGPT/GPTQ at WBITS
if [ "$BUDGET" = stored ]; then NGROUPS=${NGROUPS:-auto}; else NGROUPS=${NGROUPS:-10}; fi  # clusters per linear
NSAMPLES=${NSAMPLES:-128}     # calibration windows of 2048 tokens
SAVE=${SAVE:-out/$(basename "${MODEL%.gguf}")-s${SPARSITY}-t${TARGET}${BUDGET#weight}-k${NGROUPS}}
LOG_DIR=${LOG_DIR:-logs}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/$(basename "${MODEL%.gguf}")-$(date +%Y%m%d-%H%M%S).log"
echo "GPU(s) ${CUDA_VISIBLE_DEVICES:-all}; log: $LOG; model will be saved to $SAVE"

python "$HERE/vicuna_mi.py" "$MODEL" "$DATASET" \
    --sparsity "$SPARSITY" \
    --wbits "$WBITS" \
    --target_avg_bits "$TARGET" \
    --bits_budget "$BUDGET" \
    --use_mi_grouping "$MI" \
    --n_groups "$NGROUPS" \
    --nsamples "$NSAMPLES" \
    --save "$SAVE" \
    "$@" 2>&1 | tee "$LOG"
