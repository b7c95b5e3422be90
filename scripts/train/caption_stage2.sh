#!/usr/bin/env bash
# Caption stage 2: self-critical training with a CIDEr-D reward (criterion mue_scst), from stage 1.
#
#   scripts/train/caption_stage2.sh DATA_DIR STAGE1_CHECKPOINT SAVE_DIR [extra fairseq-train args]
#   scripts/train/caption_stage2.sh --synthetic DATA_DIR SAVE_DIR [extra fairseq-train args]
#
# DATA_DIR: the caption TSVs of stage 1. STAGE1_CHECKPOINT: stage 1's best checkpoint
# (caption_stage1.sh's SAVE_DIR/checkpoint_best.pt), loaded with --finetune-from-model.
# Hyperparameters: recipe "caption_stage2" of mue/recipes.py (docs/OFA.md, "MuE reference runs"):
# self-critical training, CIDEr-D reward with document frequencies from the training references, beam search's 5 best captions per image (OFA's
# --scst-args beam 5, max_len_b 16) each with the leave-one-out baseline of the other four, lr 1e-5,
# 3 epochs, no dropout (dropout and drop-path 0); as stage 1: polynomial decay with 6 % warm-up, Adam,
# clip 1.0, frozen token embeddings, 480 px, effective batch 64 (BATCH_SIZE 2 per process by default:
# each row becomes 5 captions plus, with a CE weight, its ground truth).
# CIDEr-D document frequencies: CIDER_DF (default SAVE_DIR/cider_d_df.json); mue_scst computes them from
# the training references at the first step and writes the file when it does not exist yet.
# Training references: SCST_REFS (default SAVE_DIR/train_refs.sqlite), a reference store looked up per
# batch; built from train.tsv at the first step when missing (or ahead, with
# `python -m mue.data.reference_store build-refs DATA_DIR/train.tsv --out FILE`), rebuilt if train.tsv changed.
# SCST_CE_WEIGHT (default 0: plain SCST, as the reference run; --synthetic 0.5) adds that much of MuE's
# layer-wise cross-entropy on the ground truth, to keep every decoder layer a usable exit.
# --synthetic: the recipe's CPU version (what `make demo` trains), mue_ofa_micro on a synthetic benchmark
# (generated into DATA_DIR if missing), 64 px, CPU, lr 3e-5, 1 epoch, batch 32; from scratch, or from
# FINETUNE_FROM (e.g. a synthetic stage-1 checkpoint_best.pt) when set.
# Its token embeddings train (no --freeze-embeddings): the chain starts from scratch, not from OFA's weights.
# Environment: NGPU, BATCH_SIZE, EFFECTIVE_BATCH, EPOCHS, LR, WARMUP_RATIO, SYN_NUM_* (see common.sh), CIDER_DF,
# SCST_REFS, SCST_CE_WEIGHT, FINETUNE_FROM (synthetic only).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
load_recipe caption_stage2 ${SCST_CE_WEIGHT:+--set "scst-ce-weight=$SCST_CE_WEIGHT"}
launch_options

if [[ "$SYNTHETIC" == 1 ]]; then
    make_synthetic_data "$DATA_DIR"
    DATA="$DATA_DIR/caption"
    if [[ -n "${FINETUNE_FROM:-}" ]]; then
        [[ -f "$FINETUNE_FROM" ]] || die "FINETUNE_FROM checkpoint not found: $FINETUNE_FROM"
        RUN+=(--finetune-from-model "$FINETUNE_FROM")
    fi
else
    DATA="$DATA_DIR"
fi
schedule_updates "$(count_rows "$DATA/train.tsv")" "$EPOCHS"
optimization_args
mkdir -p "$SAVE_DIR"

launch "$DATA" "${RECIPE_ARGS[@]}" "${RUN[@]}" "${OPTIM[@]}" \
    --scst-cider-df "${CIDER_DF:-$SAVE_DIR/cider_d_df.json}" --scst-refs "${SCST_REFS:-$SAVE_DIR/train_refs.sqlite}" \
    "${EXTRA_ARGS[@]}"
