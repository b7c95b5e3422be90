#!/usr/bin/env bash
# Caption stage 1: fine-tune OFA on COCO captions with MuE's layer-wise loss (cross-entropy stage).
#
#   scripts/train/caption_stage1.sh DATA_DIR OFA_CHECKPOINT SAVE_DIR [extra fairseq-train args]
#   scripts/train/caption_stage1.sh --synthetic DATA_DIR SAVE_DIR [extra fairseq-train args]
#
# DATA_DIR holds OFA's caption TSVs (train.tsv one caption per line; valid.tsv/test.tsv with '&&'-joined
# references) and dict.txt (or pass --dict-file). OFA_CHECKPOINT: an official OFA-base checkpoint converted
# with `python -m mue.checkpoints.convert_ofa`, loaded with --finetune-from-model.
# Hyperparameters: recipe "caption_stage1" of mue/recipes.py (docs/OFA.md, "MuE reference runs"): lr 1e-5,
# 5 epochs, label smoothing 0.1, frozen token embeddings, validation CIDEr with beam 5, max_len_b 16,
# no-repeat 3-gram; like SNLI-VE: polynomial decay with 6 % warm-up, Adam (0.9, 0.999, 1e-8), weight decay
# 0.01, clip 1.0, dropout 0.1, drop-path 0.1, 480 px, max source 80, max target 20, effective batch 64.
# OFA's drop-worst: after 6000 updates each layer's loss leaves out its 20 % highest-loss tokens
# (--drop-worst-ratio 0.2 --drop-worst-after 6000).
# The best checkpoint (by validation CIDEr) is SAVE_DIR/checkpoint_best.pt: the input of caption_stage2.sh.
# --synthetic: the recipe's CPU version (what `make demo` trains), mue_ofa_micro from scratch on a synthetic
# benchmark (generated into DATA_DIR if missing), 64 px, lr 3e-4, 3 epochs, batch 32, validation beam 2, no
# drop-worst, and the token embeddings train: --freeze-embeddings keeps pretrained (OFA) embeddings, and the
# embedding is tied to the output projection, so frozen from scratch it would stay a random output layer.
# Environment: NGPU, BATCH_SIZE, EFFECTIVE_BATCH, EPOCHS, LR, WARMUP_RATIO, SYN_NUM_* (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
load_recipe caption_stage1
launch_options

if [[ "$SYNTHETIC" == 1 ]]; then
    make_synthetic_data "$DATA_DIR"
    DATA="$DATA_DIR/caption"
else
    DATA="$DATA_DIR"
fi
schedule_updates "$(count_rows "$DATA/train.tsv")" "$EPOCHS"
optimization_args

launch "$DATA" "${RECIPE_ARGS[@]}" "${RUN[@]}" "${OPTIM[@]}" "${EXTRA_ARGS[@]}"
