# The recipe for weights on version-2 stories (issue "Quality"): the DoD model (hierarchical clips plus 20%
# autoregressive ones, as the bundled weights) and the paper's FDM* baseline (the same architecture, the same
# T-KLVAE and the same training compute: as many steps of the same batch, consecutive 16-frame clips only, first
# frame given; run it with `generate --mode ar`). One GPU, in calls of under 10 minutes (the device tool's limit);
# each call resumes its run folders. From the repository root:
#   bash train/recipe_v2.sh vae          # both T-KLVAE stages (shared: both MTDs start from this T-KLVAE)
#   bash train/recipe_v2.sh mtd          # one chunk of both MTDs at once (repeat until both report their steps)
#   bash train/recipe_v2.sh export       # fp16 checkpoints of both
# A later session (a fresh machine, so a fresh optimizer) continues both MTDs from those fp16 checkpoints with a new
# clip seed, in new run folders, again at equal steps:
#   RUNS=runs2 INIT_DIR=runs SEED=5 MTD_LR=1e-4 bash train/recipe_v2.sh mtd
# Both MTDs train at once on the one GPU, so that both see the same machine and the same wall-clock budget. Measured
# on an H200 (benchmarks/results/training/v2-training-summary.json): 4.2 steps/s each at batch 32, 8.4 together,
# about what one run alone reached on version-1 stories (9.2): running them together neither gains nor loses much.
# The run of 2026-11-25: 3858 steps each (a 90 s call to measure the rate, then one call to the step count both
# reach by a deadline: MTD_STEPS=3858). The third run continued the second one's MTDs (1795 steps) by 3191 steps each
# (benchmarks/results/training/v2c-training-summary.json); the fourth continued the third's by 2814 steps each
# (RUNS=runs3 INIT_DIR=runs2 SEED=6; 7800 in all; v2d-training-summary.json), the fifth the fourth's by 2290
# (RUNS=runs4 INIT_DIR=runs3 SEED=7; 10090 in all; v2e-training-summary.json). The sixth added 663 (SEED=8; v2f-*);
# the seventh, the first with CUDA-graph steps (8.7 instead of 4.4 steps/s each), 3667 (SEED=9; 14420 in all; v2g-*).
set -euo pipefail
PHASE=${1:?usage: recipe_v2.sh vae|mtd|export}
RUNS=${RUNS:-runs}
SECONDS_PER_CALL=${SECONDS_PER_CALL:-480}
MTD_STEPS=${MTD_STEPS:-5000} MTD_LR=${MTD_LR:-2e-4} SEED=${SEED:-0} INIT_DIR=${INIT_DIR:-}
# Smaller values for a trial run on the CPU:
#   PRESET=tiny STORIES=2 STORY_FRAMES=300 VAE_IMAGE_STEPS=2 VAE_TEMPORAL_STEPS=2 MTD_STEPS=2
PRESET=${PRESET:-small} STORIES=${STORIES:-64} STORY_FRAMES=${STORY_FRAMES:-3376}
VAE_IMAGE_STEPS=${VAE_IMAGE_STEPS:-4000} VAE_TEMPORAL_STEPS=${VAE_TEMPORAL_STEPS:-3000}
# Seconds of each T-KLVAE stage on an H200 (it ends there with the steps done): the first run used 100 and 120, too
# short (held-out PSNR 25.5 dB; its reconstructions capped every quality score at 78% attribute accuracy); the second,
# 250 and 220 (27.8 dB; 90.8% attribute accuracy, 92.9% presence; benchmarks/results/quality-v2b-cpu-f9c5130.md).
VAE_IMAGE_SECONDS=${VAE_IMAGE_SECONDS:-250} VAE_TEMPORAL_SECONDS=${VAE_TEMPORAL_SECONDS:-220}
COMMON="--preset $PRESET --stories $STORIES --story-frames $STORY_FRAMES --story-version 2 --workers 8 --no-progress"
# MTD_BATCH: clips per MTD step (32 in every run so far). CUDA_GRAPHS=0: eager MTD steps (the runs up to the sixth); since then each step is replayed as one CUDA graph
CUDA_GRAPHS=${CUDA_GRAPHS:-1}
MTD="--stage mtd --steps $MTD_STEPS --batch ${MTD_BATCH:-32} --lr $MTD_LR --seed $SEED --save-every 1000 --time-limit $SECONDS_PER_CALL"
if [ "$CUDA_GRAPHS" = 0 ]; then MTD="$MTD --no-cuda-graphs"; fi
# COMPILE=1: the step's forward and backward through torch.compile as well (TrainOptions.compile)
if [ "${COMPILE:-0}" = 1 ]; then MTD="$MTD --compile"; fi
t() { python -P -m nuwaxl.cli train $COMMON "$@"; }
case $PHASE in
  vae)
    t --run $RUNS/v2-vae --stage vae-image --steps $VAE_IMAGE_STEPS --batch 64 --lr 4e-4 \
      --time-limit $VAE_IMAGE_SECONDS --at-limit finish
    t --run $RUNS/v2-vae --stage vae-temporal --steps $VAE_TEMPORAL_STEPS --batch 8 --lr 1e-4 \
      --time-limit $VAE_TEMPORAL_SECONDS --at-limit finish ;;
  mtd)  # --init is read by a run's first call; later calls resume the run; a finished run is left as it is
    pids=()
    for run in dod:0.2 fdm:1; do
      name=v2-${run%:*}
      if grep -q '"mtd"' $RUNS/$name/summary.json 2>/dev/null; then echo "$name: finished" > $RUNS/$name.out; continue; fi
      init=$RUNS/v2-vae/models.safetensors
      if [ -n "$INIT_DIR" ]; then  # a continuation trains fp32 weights: the fp16 export converted once
        init=$RUNS/$name-init32.safetensors; mkdir -p $RUNS
        [ -f $init ] || python -P -c 'import sys; from nuwaxl.models.checkpoint import load_checkpoint, save_checkpoint
save_checkpoint(load_checkpoint(sys.argv[1]), sys.argv[2])  # fp32 by default' $INIT_DIR/$name-fp16.safetensors $init
      fi
      t --run $RUNS/$name --init $init $MTD --ar-fraction ${run#*:} > $RUNS/$name.out 2>&1 &
      pids+=($!)
    done
    rc=0; for p in "${pids[@]}"; do wait $p || rc=1; done
    tail -n 2 $RUNS/v2-dod.out $RUNS/v2-fdm.out; exit $rc ;;
  export)
    python -P -c 'import sys, torch; from nuwaxl.models.checkpoint import load_checkpoint, save_checkpoint
for run in sys.argv[2:]:
    save_checkpoint(load_checkpoint(f"{sys.argv[1]}/{run}/models.safetensors"),
                    f"{sys.argv[1]}/{run}-fp16.safetensors", dtype=torch.float16)' $RUNS v2-dod v2-fdm ;;
  *) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
