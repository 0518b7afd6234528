# The recipe for weights on version-2 stories (issue "Quality"): the DoD model (hierarchical clips plus 20%
# autoregressive ones, as the bundled weights) and the paper's FDM* baseline (the same architecture and the same
# training compute, consecutive 16-frame clips only, first frame given; run it with `generate --mode ar`). One GPU, in
# calls of under 10 minutes (the device tool's limit); each call resumes its run folder. From the repository root:
#   bash train/recipe_v2.sh vae          # both T-KLVAE stages (shared: FDM* starts from the same T-KLVAE)
#   bash train/recipe_v2.sh dod          # one MTD chunk of the DoD model (repeat until it reports its steps)
#   bash train/recipe_v2.sh fdm          # one MTD chunk of FDM*: the same steps and batch, so the same compute
#   bash train/recipe_v2.sh export       # fp16 checkpoints of both
# Not yet run: logs and scores will land in benchmarks/results/training/.
set -euo pipefail
PHASE=${1:?usage: recipe_v2.sh vae|dod|fdm|export}
SECONDS_PER_CALL=${SECONDS_PER_CALL:-480}
COMMON="--preset small --stories 64 --story-frames 3376 --story-version 2 --workers 16 --no-progress"
MTD="--stage mtd --steps 60000 --batch 32 --lr 2e-4 --save-every 2000 --time-limit $SECONDS_PER_CALL"
t() { python -P -m nuwaxl.cli train $COMMON "$@"; }
case $PHASE in
  vae)
    t --run runs/v2-vae --stage vae-image --steps 4000 --batch 64 --lr 4e-4 --time-limit 100 --at-limit finish
    t --run runs/v2-vae --stage vae-temporal --steps 3000 --batch 8 --lr 1e-4 --time-limit 120 --at-limit finish ;;
  # both start from the trained T-KLVAE (--init is read by a run's first call; later calls resume the run)
  dod) t --run runs/v2-dod --init runs/v2-vae/models.safetensors $MTD --ar-fraction 0.2 ;;
  fdm) t --run runs/v2-fdm --init runs/v2-vae/models.safetensors $MTD --ar-fraction 1 ;;
  export)
    python -P -c 'import sys, torch; from nuwaxl.models.checkpoint import load_checkpoint, save_checkpoint
for run in sys.argv[1:]:
    save_checkpoint(load_checkpoint(f"runs/{run}/models.safetensors"), f"runs/{run}/{run}-fp16.safetensors",
                    dtype=torch.float16)' v2-dod v2-fdm ;;
  *) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
