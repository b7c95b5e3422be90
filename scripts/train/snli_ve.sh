#!/usr/bin/env bash
# Fine-tune OFA on SNLI-VE with MuE's layer-wise loss (the paper's SNLI-VE run).
#
#   scripts/train/snli_ve.sh DATA_DIR OFA_CHECKPOINT SAVE_DIR [extra fairseq-train args]
#   scripts/train/snli_ve.sh --synthetic DATA_DIR SAVE_DIR [extra fairseq-train args]
#
# DATA_DIR holds OFA's SNLI-VE TSVs {train,valid,test}.tsv and dict.txt (or pass --dict-file).
# OFA_CHECKPOINT: an official OFA-base checkpoint converted with
#   python -m mue.checkpoints.convert_ofa ofa_base.pt ofa_base_mue.pt
# loaded with --finetune-from-model (weights only; optimizer, schedule and data position start fresh).
# Hyperparameters: recipe "snli_ve" of mue/recipes.py (docs/OFA.md, "MuE reference runs"): lr 5e-5,
# 5 epochs, polynomial decay with 6 % warm-up, Adam (0.9, 0.999, 1e-8), weight decay 0.01, clip 1.0,
# effective batch 64, dropout 0.1, drop-path 0.1, label smoothing 0, 480 px, max source 80, max target 20.
# --synthetic: the recipe's CPU version (what `make demo` trains), mue_ofa_micro from scratch on a
# synthetic benchmark (generated into DATA_DIR if missing), 64 px, lr 1e-3, 3 epochs, batch 32.
# Environment: NGPU, BATCH_SIZE, EFFECTIVE_BATCH, EPOCHS, LR, WARMUP_RATIO, SYN_NUM_* (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
load_recipe snli_ve
launch_options

if [[ "$SYNTHETIC" == 1 ]]; then
    make_synthetic_data "$DATA_DIR"
    DATA="$DATA_DIR/snli_ve"
else
    DATA="$DATA_DIR"
fi
schedule_updates "$(count_rows "$DATA/train.tsv")" "$EPOCHS"
optimization_args

launch "$DATA" "${RECIPE_ARGS[@]}" "${RUN[@]}" "${OPTIM[@]}" "${EXTRA_ARGS[@]}"
