# The recipe that trained the bundled `small` weights, on one GPU, in calls of under 10 minutes (the device tool's
# limit). Each call resumes the run folder; run from the repository root on a GPU machine:
#   bash train/recipe_small.sh vae      # both T-KLVAE stages, then the first MTD chunk
#   bash train/recipe_small.sh mtd      # one more MTD chunk (resumes)
#   bash train/recipe_small.sh final    # the last MTD chunk, ending the stage, and the fp16 export
set -euo pipefail
PHASE=${1:?usage: recipe_small.sh vae|mtd|final|more}
RUN=${RUN:-runs/small}
MTD_SECONDS=${MTD_SECONDS:-240}
COMMON="--run $RUN --preset small --stories 64 --story-frames 3376 --workers 16 --no-progress"
MTD="--stage mtd --steps 40000 --batch 32 --lr 2e-4 --save-every 2000"
t() { python -P -m nuwaxl.cli train $COMMON "$@"; }
case $PHASE in
  vae)
    t --stage vae-image --steps 4000 --batch 64 --lr 4e-4 --time-limit 100 --at-limit finish
    t --stage vae-temporal --steps 3000 --batch 8 --lr 1e-4 --time-limit 120 --at-limit finish
    t $MTD --time-limit "$MTD_SECONDS" ;;
  mtd) t $MTD --time-limit "$MTD_SECONDS" ;;
  final) t $MTD --time-limit "$MTD_SECONDS" --at-limit finish --export "$RUN/small-fp16.safetensors" ;;
  more) t --init "${2:?init checkpoint}" --stage mtd --steps "${MORE_STEPS:-40000}" --batch 64 --lr "${MORE_LR:-2e-4}" \
          --seed "${SEED:-0}" --save-every 2000 \
          --time-limit "$MTD_SECONDS" --at-limit finish --export "$RUN/small-fp16.safetensors" ;;
  *) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
# Second session (a fresh machine, so a fresh optimizer): more MTD steps from the first run's final weights, with
# twice the batch (the step was bound by the host, not the GPU):
#   RUN=runs/small2 bash train/recipe_small.sh more runs/init/models32.safetensors
# Third session: a shorter polish from the bundled fp16 weights, new clip seed, lr decaying over the steps that fit:
#   RUN=runs/small3 MTD_SECONDS=400 MORE_STEPS=2000 MORE_LR=1e-4 SEED=3 bash train/recipe_small.sh more \
#     nuwaxl/assets/weights/small.safetensors
# Then the training record (what generation warns against: words outside these captions, other resolutions) was
# written into the bundled file's metadata, weights unchanged, from the captions of the stories trained on:
#   python -c 'from nuwaxl.config import TrainingRecord as R; from nuwaxl.models.checkpoint import with_sampling;
#     from nuwaxl.tokenizer import words; from nuwaxl.train.data import LongVideo as V;
#     w = sorted({x for i in range(64) for f in range(3376) for x in words(V(0, i, 3376).caption(f))});
#     p = "nuwaxl/assets/weights/small.safetensors"; with_sampling(p, p, trained_on=R(True, 64, tuple(w)))'
# (runs trained with this version record it themselves.)
