# Shared part of the MuE training scripts (snli_ve.sh, caption_stage1.sh, caption_stage2.sh); sourced, not run.
#
# What it does for a script:
#   * parse_args "$@": full mode   SCRIPT DATA_DIR CHECKPOINT SAVE_DIR [extra fairseq-train args...]
#                      synthetic   SCRIPT --synthetic DATA_DIR SAVE_DIR [extra fairseq-train args...]
#     (or SYNTHETIC=1 in the environment instead of --synthetic);
#   * load_recipe NAME: the stage's hyper-parameters from mue/recipes.py, the one table of them (real, or
#     the CPU version with --synthetic): RECIPE_ARGS and the defaults of LR, EPOCHS, BATCH_SIZE,
#     EFFECTIVE_BATCH and WARMUP_RATIO; launch_options: RUN (device, workers, logging, start checkpoint);
#   * make_synthetic_data DIR: writes a tiny synthetic benchmark there (mue.data.synthetic) unless present;
#   * schedule_updates ROWS EPOCHS: UPDATE_FREQ (effective batch EFFECTIVE_BATCH), TOTAL_UPDATES and
#     WARMUP_UPDATES (polynomial decay, WARMUP_RATIO of the total, or the recipe's fixed warm-up);
#   * launch ARGS...: fairseq-train with ARGS, in one process, or under torchrun with NGPU processes
#     (on each of NNODES machines).
#
# Environment (all optional):
#   NGPU             processes/GPUs (default 1); > 1 uses torchrun --nproc-per-node NGPU and
#                    --distributed-world-size NGPU (in synthetic mode CPU processes on gloo)
#   NNODES           machines (default 1); > 1 runs the same command on every machine, each with its own
#                    NODE_RANK, under torchrun --nnodes NNODES --node-rank NODE_RANK --master-addr MASTER_ADDR
#                    --master-port MASTER_PORT --nproc-per-node NGPU, --distributed-world-size NNODES*NGPU
#   NODE_RANK        this machine's number, 0 .. NNODES-1 (required when NNODES > 1); machine 0 holds
#                    ranks 0 .. NGPU-1, so rank 0, which writes the checkpoints, is always on it
#   MASTER_ADDR      address of machine 0 that the others can reach (required when NNODES > 1)
#   MASTER_PORT      a free TCP port on machine 0 (default 29500, torchrun's)
#   BATCH_SIZE       sentences per process and step (default: the recipe's, 8 or 2; synthetic 32)
#   EFFECTIVE_BATCH  sentences per update over all processes (default 64; synthetic BATCH_SIZE*NNODES*NGPU):
#                    --update-freq = EFFECTIVE_BATCH / (BATCH_SIZE * NNODES * NGPU)
#   EPOCHS           training epochs (default: the recipe's)
#   LR               learning rate (default: the recipe's)
#   WARMUP_RATIO     warm-up share of the updates (default: the recipe's, 0.06)
#   SYN_NUM_TRAIN, SYN_NUM_VALID, SYN_NUM_TEST   synthetic images per split (default 64, 8, 8)
#   PYTHON           python with mue and fairseq installed (default: python on PATH)
#   FAIRSEQ_TRAIN    fairseq-train executable (default: fairseq-train on PATH)

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python}"
# --user-dir: the mue package that $PYTHON imports (an installed one, wherever it is; the current directory
# is left out of the search), else this clone's source
USER_DIR="$("$PYTHON" -c 'import importlib.util, os, sys
sys.path = [p for p in sys.path if p not in ("", ".", os.getcwd())]
spec = importlib.util.find_spec("mue")
print(list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else "")' \
    2>/dev/null || true)"
USER_DIR="${USER_DIR:-$REPO_ROOT/mue}"
NGPU="${NGPU:-1}"
NNODES="${NNODES:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"

die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

usage() {
    die "usage: $(basename "$0") DATA_DIR CHECKPOINT SAVE_DIR [fairseq-train args...]
       $(basename "$0") --synthetic DATA_DIR SAVE_DIR [fairseq-train args...]   (or SYNTHETIC=1)
$1"
}

# Sets SYNTHETIC (0/1), DATA_DIR, CHECKPOINT (empty when synthetic), SAVE_DIR, EXTRA_ARGS (array).
parse_args() {
    SYNTHETIC="${SYNTHETIC:-0}"
    if [[ "${1:-}" == "--synthetic" ]]; then
        SYNTHETIC=1
        shift
    fi
    [[ "$SYNTHETIC" == 0 || "$SYNTHETIC" == 1 ]] || usage "SYNTHETIC must be 0 or 1, got '$SYNTHETIC'"
    CHECKPOINT=""
    if [[ "$SYNTHETIC" == 1 ]]; then
        [[ $# -ge 2 ]] || usage "synthetic mode needs DATA_DIR and SAVE_DIR"
        DATA_DIR="$1"
        SAVE_DIR="$2"
        shift 2
    else
        [[ $# -ge 3 ]] || usage "needs DATA_DIR, CHECKPOINT and SAVE_DIR"
        DATA_DIR="$1"
        CHECKPOINT="$2"
        SAVE_DIR="$3"
        shift 3
        [[ -d "$DATA_DIR" ]] || die "data directory not found: $DATA_DIR"
        [[ -f "$CHECKPOINT" ]] || die "checkpoint not found: $CHECKPOINT (convert an official OFA one with: \
$PYTHON -m mue.checkpoints.convert_ofa OFA.pt OUT.pt)"
    fi
    [[ "$NGPU" =~ ^[1-9][0-9]*$ ]] || die "NGPU must be a positive integer, got '$NGPU'"
    [[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
    if ((NNODES > 1)); then
        [[ "${NODE_RANK:-}" =~ ^(0|[1-9][0-9]*)$ ]] && ((NODE_RANK < NNODES)) ||
            die "NNODES=$NNODES needs NODE_RANK, this machine's number from 0 to $((NNODES - 1)), got '${NODE_RANK:-}'"
        [[ -n "${MASTER_ADDR:-}" ]] ||
            die "NNODES=$NNODES needs MASTER_ADDR, the address of the machine with NODE_RANK=0"
        [[ "$MASTER_PORT" =~ ^[1-9][0-9]{0,4}$ ]] && ((MASTER_PORT < 65536)) ||
            die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
    fi
    NPROCS=$((NNODES * NGPU))  # all processes (not WORLD_SIZE: torchrun exports that name)
    EXTRA_ARGS=("$@")
}

# Writes a small synthetic benchmark into $1 unless $1/dict.txt exists.
make_synthetic_data() {
    local dir="$1"
    if [[ -f "$dir/dict.txt" ]]; then
        echo "using the synthetic data in $dir"
        return
    fi
    "$PYTHON" -m mue.data.synthetic --out "$dir" --num-train "${SYN_NUM_TRAIN:-64}" \
        --num-valid "${SYN_NUM_VALID:-8}" --num-test "${SYN_NUM_TEST:-8}" --image-size 64 >/dev/null
    echo "wrote synthetic data to $dir"
}

# Non-blank lines of a TSV file: the training examples (caption TSV: one per caption).
count_rows() {
    [[ -f "$1" ]] || die "training file not found: $1"
    grep -c . "$1" || true
}

# load_recipe NAME [--set OPTION=VALUE ...]: RECIPE_ARGS, the fairseq-train options of recipe NAME in
# mue/recipes.py (model, loss, regularisation, validation, optimiser) for this mode (--synthetic: the CPU
# version, from scratch; otherwise from pretrained weights), and LR, EPOCHS, BATCH_SIZE, EFFECTIVE_BATCH,
# WARMUP_RATIO from it where the environment leaves them unset.
load_recipe() {
    local name="$1" code
    shift
    local mode=(--pretrained)
    if [[ "$SYNTHETIC" == 1 ]]; then
        mode=(--synthetic)
    fi
    code="$(PYTHONPATH="$(dirname "$USER_DIR")${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m mue.recipes "$name" \
        "${mode[@]}" "$@" 2>/dev/null)" || die "could not read recipe '$name' from $USER_DIR/recipes.py with $PYTHON"
    eval "$code"
    LR="${LR:-$RECIPE_LR}"
    EPOCHS="${EPOCHS:-$RECIPE_EPOCHS}"
    BATCH_SIZE="${BATCH_SIZE:-$RECIPE_BATCH_SIZE}"
    EFFECTIVE_BATCH="${EFFECTIVE_BATCH:-$RECIPE_EFFECTIVE_BATCH}"
    WARMUP_RATIO="${WARMUP_RATIO:-$RECIPE_WARMUP_RATIO}"
}

# schedule_updates ROWS EPOCHS -> UPDATE_FREQ, TOTAL_UPDATES, WARMUP_UPDATES (after load_recipe).
# fairseq's polynomial_decay needs the update count (OFA gives a warm-up ratio), so it is computed here
# the way fairseq batches: ceil(ceil(rows / (batch * world size)) / update_freq) updates per epoch. A recipe
# with a fixed warm-up and decay length (the synthetic ones) uses those instead.
schedule_updates() {
    local rows="$1" epochs="$2" per_step
    per_step=$((BATCH_SIZE * NPROCS))
    EFFECTIVE_BATCH="${EFFECTIVE_BATCH:-$per_step}"
    if ((EFFECTIVE_BATCH % per_step != 0)); then
        if ((NNODES > 1)); then
            die "EFFECTIVE_BATCH=$EFFECTIVE_BATCH is not a multiple of BATCH_SIZE*NNODES*NGPU=$BATCH_SIZE*$NNODES*$NGPU"
        fi
        die "EFFECTIVE_BATCH=$EFFECTIVE_BATCH is not a multiple of BATCH_SIZE*NGPU=$BATCH_SIZE*$NGPU"
    fi
    UPDATE_FREQ=$((EFFECTIVE_BATCH / per_step))
    local steps=$(((rows + per_step - 1) / per_step))
    local per_epoch=$(((steps + UPDATE_FREQ - 1) / UPDATE_FREQ))
    TOTAL_UPDATES="${RECIPE_DECAY_UPDATES:-$((per_epoch * epochs))}"
    WARMUP_UPDATES="${RECIPE_WARMUP_UPDATES:-$("$PYTHON" -c "print(int($WARMUP_RATIO * $TOTAL_UPDATES))")}"
    echo "$rows training rows, batch $BATCH_SIZE x $NPROCS process(es) x update-freq $UPDATE_FREQ:" \
        "$((per_epoch * epochs)) updates over $epochs epoch(s), $WARMUP_UPDATES warm-up, decay over $TOTAL_UPDATES"
}

# launch_options: RUN=(device, data workers, log interval, and the start checkpoint) of the synthetic CPU
# version or of the real run from $CHECKPOINT.
launch_options() {
    if [[ "$SYNTHETIC" == 1 ]]; then
        RUN=(--cpu --distributed-backend gloo --num-workers 0 --log-interval 1)
    else
        RUN=(--finetune-from-model "$CHECKPOINT" --num-workers 4 --log-interval 10)
    fi
}

# optimization_args: OPTIM=(learning rate and schedule, batching and checkpoint options, the same in every
# recipe); call after schedule_updates.
optimization_args() {
    OPTIM=(--lr "$LR" --warmup-updates "$WARMUP_UPDATES" --total-num-update "$TOTAL_UPDATES"
           --max-epoch "$EPOCHS" --batch-size "$BATCH_SIZE" --update-freq "$UPDATE_FREQ"
           --required-batch-size-multiple 1 --no-epoch-checkpoints --log-format simple)
}

# launch ARGS...: fairseq-train ARGS (plus --user-dir), under torchrun when NNODES*NGPU > 1.
# Several machines use torchrun's static rendezvous (--node-rank, --master-addr) rather than c10d: c10d
# numbers the machines by sorting their host names, so rank 0, which writes the checkpoints and reads the
# one to resume from, could be on any machine; here it is always on NODE_RANK 0.
launch() {
    local train="${FAIRSEQ_TRAIN:-$(command -v fairseq-train || true)}"
    [[ -n "$train" ]] || die "fairseq-train not found on PATH (activate the virtualenv or set FAIRSEQ_TRAIN)"
    mkdir -p "$SAVE_DIR"
    local args=("$@" --user-dir "$USER_DIR" --save-dir "$SAVE_DIR")
    if ((NPROCS > 1)); then
        # torchrun sets RANK/WORLD_SIZE; fairseq needs --distributed-world-size (see mue/compat.py)
        local torchrun="${TORCHRUN:-$(command -v torchrun || true)}"
        [[ -n "$torchrun" ]] || die "NNODES=$NNODES x NGPU=$NGPU processes need torchrun on PATH"
        local where=(--standalone)
        if ((NNODES > 1)); then
            where=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
                   --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
        fi
        set -x
        "$torchrun" "${where[@]}" --nproc-per-node "$NGPU" "$train" "${args[@]}" --distributed-world-size "$NPROCS"
    else
        set -x
        "$train" "${args[@]}"
    fi
}
