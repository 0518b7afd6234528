"""Training as in the paper, in three stages that share one run folder:

1. `vae-image`: the spatial layers, as an image KL-VAE (the T-KLVAE built with `temporal=False`) on single frames;
2. `vae-temporal`: the temporal layers added (identity / zero initialised, so the model starts as the image VAE)
   and trained on clips; at the end the latent scale is set so diffusion sees ~unit-variance latents;
3. `mtd`: the Mask 3D-UNet and the prompt encoder trained directly on long videos by sparse hierarchical sampling
   (global clips at the coarsest stride with an all-zero condition, local clips with their first and last frames
   as the condition), plus autoregressive-style clips (first frame given) so the AR baseline runs the same model
   in a setting it was trained for. The T-KLVAE is frozen.

A run folder holds `models.safetensors` (the current weights: a normal trt-nuwaxl checkpoint), `state.pt`
(optimizer, EMA weights, step and random state of the stage in progress) and `log.jsonl` (one line per logged
step). Saves are atomic; `train` on a folder with an unfinished stage resumes it. At the end of a stage its EMA
weights become `models.safetensors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nuwaxl.config import TrainingRecord
from nuwaxl.diffusion import NoiseSchedule
from nuwaxl.engine.graphs import CAPTURE_ERROR_MODE
from nuwaxl.errors import UserError, option
from nuwaxl.files import atomic_output, write_text
from nuwaxl.models.checkpoint import NuwaModels, load_checkpoint, save_checkpoint
from nuwaxl.models.vae import TKLVAE
from nuwaxl.runtime.planner import max_frames
from nuwaxl.tokenizer import words
from nuwaxl.train.sampling import TrainingClip, sample_clip
from nuwaxl.train.videos import CorpusVideo

STAGES = ("vae-image", "vae-temporal", "mtd")


@dataclass(frozen=True)
class TrainOptions:
    stage: str
    steps: int  # total optimizer steps of the stage (a resumed stage continues up to this)
    batch: int = 16  # frames (vae-image) or clips (vae-temporal, mtd) per step
    lr: float = 2e-4
    warmup: int = 100
    ema: float = 0.999
    depth: int = 3  # mtd: deepest tree sampled (trees of depth 1..depth, levels uniform)
    ar_fraction: float = 0.2  # mtd: share of autoregressive clips (first frame as condition); 1.0: FDM*
    # mtd: share of the autoregressive clips with no frame given, as the first window of an AR video (`plan_ar`);
    # without them FDM* (ar_fraction 1) never sees the unconditioned window every AR video starts with
    ar_first_window: float = 0.1
    prompt_dropout: float = 0.1  # mtd: empty prompt, for classifier-free guidance
    kl_weight: float = 1e-6
    log_every: int = 50
    save_every: int = 1000
    seed: int = 0
    time_limit_s: float | None = None  # wall-clock budget of this call
    # mtd on CUDA: each step (forward, backward, optimizer, EMA) replayed as one CUDA graph after a few eager steps.
    # The MTD of the `small` preset is so small that an eager step is mostly kernel launches (measured:
    # benchmarks/results/EXPERIMENTS.md); the graph computes the same step. Off: every step eager.
    cuda_graphs: bool = True
    # mtd: the step's forward (and so its backward) compiled by torch.compile (`COMPILE_BACKEND`), fixed shapes as
    # under CUDA graphs; fewer, fused kernels. The first steps pay the compilation (minutes for `small`).
    compile: bool = False
    at_limit: str = "pause"  # at the time limit: "pause" (save, resume later) or "finish" (end the stage early)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise UserError(f"unknown stage {self.stage!r}; use one of {', '.join(STAGES)}")
        if self.at_limit not in ("pause", "finish"):
            raise UserError(f"at_limit={self.at_limit!r}: use 'pause' or 'finish'")
        if not 0.0 <= self.ar_fraction <= 1.0:
            raise UserError(f"ar_fraction={self.ar_fraction} must be between 0 and 1 (1: the FDM* baseline, trained "
                            "on consecutive clips only)")
        if not 0.0 <= self.ar_first_window <= 1.0:
            raise UserError(f"ar_first_window={self.ar_first_window} must be between 0 and 1")
        if self.steps < 1 or self.batch < 1:
            raise UserError(f"steps={self.steps} and batch={self.batch} must be at least 1")


class Corpus:
    """The training videos on the training device: uint8 frames and one prompt-token row per frame."""

    def __init__(self, videos: list[CorpusVideo], models: NuwaModels, device: torch.device):
        if not videos:
            raise UserError("the training corpus is empty")
        res = models.config.resolution
        bad = [v.name for v in videos if v.frames.shape[1:] != (res, res, 3)]
        if bad:
            raise UserError(f"videos {bad[:3]} are not {res}x{res}; load them at the model's resolution")
        captions = sorted({c for v in videos for c in v.captions} | {""})
        index = {c: i for i, c in enumerate(captions)}
        self.tokens = models.tokenizer(captions).to(device)  # (U, 77)
        self.empty = index[""]
        # All videos' frames in one tensor (video v starts at offsets[v]), so that a batch of clips is one gather
        self.frames = torch.from_numpy(np.concatenate([v.frames for v in videos])).to(device)  # (N, H, W, 3) uint8
        self.caption_ids = torch.tensor([index[c] for v in videos for c in v.captions], device=device)  # (N,)
        self.words = sorted({w for c in captions for w in words(c)})  # the vocabulary the MTD learns
        versions = {v.story_version for v in videos}
        self.story_version = versions.pop() if len(versions) == 1 else None
        self.lengths = np.array([len(v) for v in videos])
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.device = device

    def pixels(self, video: int, positions) -> torch.Tensor:
        """(L, 3, H, W) float pixels in [-1, 1]."""
        return self.pixels_at(torch.as_tensor(self.offsets[video] + np.asarray(positions), device=self.device))

    def pixels_at(self, index: torch.Tensor) -> torch.Tensor:
        """Frames by index into all videos' frames (`offsets`): (*index.shape, 3, H, W) float pixels in [-1, 1]."""
        return self.frames[index].movedim(-1, -3).float() / 127.5 - 1.0

    def pick(self, rng: np.random.Generator, min_frames: int = 1) -> int:
        ok = np.flatnonzero(self.lengths >= min_frames)
        if not len(ok):
            raise UserError(f"no training video has {min_frames} frames; use longer videos or a smaller depth")
        return int(rng.choice(ok, p=self.lengths[ok] / self.lengths[ok].sum()))


def mtd_clip(corpus: Corpus, L: int, opts: TrainOptions, rng: np.random.Generator) -> tuple[int, TrainingClip]:
    """A training clip for the MTD: hierarchical (random depth and level) or autoregressive."""
    if rng.random() < opts.ar_fraction:
        v = corpus.pick(rng, L)
        start = int(rng.integers(0, corpus.lengths[v] - L + 1))
        given = () if rng.random() < opts.ar_first_window else (0,)  # an AR video's first window, or a later one
        return v, TrainingClip(2, tuple(range(start, start + L)), given)
    depths = [m for m in range(1, opts.depth + 1) if max_frames(L, m) <= corpus.lengths.max()]
    m = int(rng.choice(depths))
    v = corpus.pick(rng, max_frames(L, m))
    return v, sample_clip(int(corpus.lengths[v]), L, m, rng)


def vae_clip(corpus: Corpus, L: int, opts: TrainOptions, rng: np.random.Generator) -> tuple[int, tuple[int, ...]]:
    """Clips the T-KLVAE meets at inference: the sparse grids of every level and consecutive frames."""
    v, clip = mtd_clip(corpus, L, opts, rng)
    return v, clip.positions


def clip_batches(corpus: Corpus, L: int, opts: TrainOptions, seed: int, clips: int, batch: int = 8):
    """Fixed-seed batches of (batch, L, 3, H, W) clips drawn like the clips generation decodes (every level's grid)."""
    rng = np.random.default_rng(seed)
    for _ in range(max(1, clips // batch)):
        yield torch.stack([corpus.pixels(*vae_clip(corpus, L, opts, rng)) for _ in range(batch)])


@torch.no_grad()
def latent_std(vae: TKLVAE, corpus: Corpus, L: int, opts: TrainOptions, clips: int = 64) -> float:
    means = [vae.encode(video)[0].float() for video in clip_batches(corpus, L, opts, opts.seed + 7, clips)]
    return float(torch.cat(means).std())


@torch.no_grad()
def condition_latents(vae: TKLVAE, video: torch.Tensor, mask: torch.Tensor, given: list[bool] | torch.Tensor,
                      blank: torch.Tensor) -> torch.Tensor:
    """The T-KLVAE means of `video` with its non-condition frames zeroed (`mask`), unscaled. A clip with no frame
    given (`given[b]` False: a global clip, an AR video's first window) is an all-zero video, whose encoding is
    `blank` (one clip's). With `given` a list, only the other clips go through the encoder. Why it pays (most of
    DoD's clips are global ones, and the frozen T-KLVAE's encodes are a large share of an eager step):
    benchmarks/results/EXPERIMENTS.md. With `given` a (B,) bool tensor every clip is encoded and those without a
    frame replaced by `blank`: the same values up to rounding, in shapes that do not depend on the clips (CUDA
    graphs)."""
    if isinstance(given, torch.Tensor):
        enc = vae.encode(video * mask)[0].to(blank.dtype)
        return torch.where(given.view(-1, *[1] * (enc.dim() - 1)), enc, blank)
    rows = [b for b, g in enumerate(given) if g]
    cond = blank.expand(video.shape[0], *blank.shape[1:]).clone()
    if rows:
        idx = torch.tensor(rows, device=video.device)
        cond[idx] = vae.encode(video[idx] * mask[idx])[0].to(cond.dtype)
    return cond


@dataclass
class MtdBatch:
    """One MTD step's random inputs, on the training device (under CUDA graphs: the graph's input buffers, refilled
    before every replay). `clips` (2, B, L): row 0 the clips' frames as indices into `Corpus.frames`, row 1 1 where a
    frame is given as a condition; `drop` (B, L) uniform numbers (prompt dropout), `t` (B,) timesteps, `eps`
    (B, L, c, h, w) noise. `given_rows`: which clips have a frame given, on the host (eager steps encode only
    those; None in a graph's buffers, whose shapes must not depend on the clips)."""
    clips: torch.Tensor
    drop: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    given_rows: list[bool] | None = None


# torch.compile's backend for `TrainOptions.compile` (the CPU test traces with "eager": the same graph, no codegen)
COMPILE_BACKEND = "inductor"

# Eager steps before the capture: lazy initialisation (cuDNN/cuBLAS handles, optimizer state, the blank encoding)
# happens in them, not in the graph. They are ordinary training steps.
GRAPH_WARMUP_STEPS = 3


class Trainer:
    def __init__(self, run_dir: str | Path, models: NuwaModels, corpus: Corpus, opts: TrainOptions,
                 device: torch.device, progress: bool = True):
        self.run_dir, self.models, self.corpus, self.opts = Path(run_dir), models, corpus, opts
        self.device, self.progress = device, progress
        self.L = models.config.frames_per_call
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
        self.schedule = NoiseSchedule.from_config(models.config.diffusion)
        # What the weights will have been trained on: generation warns about prompts outside these words and
        # resolutions other than this one (and DoD on FDM* weights). A continued run keeps the words it knew
        # before; a story version or clip mix that differs from the earlier training's is recorded as unknown.
        before = models.trained_on

        def same(now, then):
            return now if not before.trained or then in (None, now) else None

        models.trained_on = TrainingRecord(
            True, models.config.resolution, tuple(sorted(set(corpus.words) | set(before.words))),
            same(corpus.story_version, before.story_version),
            same(opts.ar_fraction, before.ar_fraction) if opts.stage == "mtd" else before.ar_fraction)
        if opts.stage == "vae-image":  # the image KL-VAE: the same tree without temporal layers
            image_cfg = dataclasses.replace(models.config.vae, temporal=False)
            self.net = TKLVAE(image_cfg).to(device)
            self.net.load_state_dict({k: v for k, v in models.vae.state_dict().items()
                                      if k in self.net.state_dict()})
            self.trainable = dict(self.net.named_parameters())
        elif opts.stage == "vae-temporal":
            self.net = models.vae
            self.trainable = {f"vae.{k}": p for k, p in models.vae.named_parameters()}
        else:
            self.net = models
            for p in models.vae.parameters():
                p.requires_grad_(False)
            self.trainable = {k: p for k, p in models.named_parameters() if not k.startswith("vae.")}
        self.graphs = opts.cuda_graphs and device.type == "cuda" and opts.stage == "mtd"
        # On CUDA one fused AdamW kernel; under CUDA graphs also capturable, with the learning rate a device tensor
        # that is refilled before each replay (a float would be frozen into the graph).
        self._adam = {"fused": True, "foreach": None, "capturable": self.graphs} if device.type == "cuda" else {}
        self._lr = torch.tensor(opts.lr, device=device) if self.graphs else None
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=opts.lr if self._lr is None else self._lr,
                                           weight_decay=0.0, **self._adam)
        self.ema = {k: p.detach().clone() for k, p in self.trainable.items()}
        self._ema_weight = torch.zeros((), device=device)  # 1 - decay of this step
        self._loss_sum = torch.zeros((), device=device)  # losses since the last log line, summed on the device
        self._loss_steps = 0
        self.step = 0
        self.last_loss: float | None = None  # the latest logged mean loss
        self.blank: torch.Tensor | None = None  # mtd: the T-KLVAE's encoding of an all-zero clip (`condition_latents`)
        self.rng = np.random.default_rng(opts.seed)
        self.torch_gen = torch.Generator(device=device).manual_seed(opts.seed)
        self._alphas = self.schedule.table(device)
        self._graph: torch.cuda.CUDAGraph | None = None  # the captured step, reading `_inputs`
        self._inputs: MtdBatch | None = None
        self._pinned: torch.Tensor | None = None  # host staging of `_inputs.clips`, reused once `_staged` has passed
        self._staged: torch.cuda.Event | None = None
        self._eager_graph_steps = 0
        self._compiled = (torch.compile(self._mtd_loss_of, backend=COMPILE_BACKEND, dynamic=False)
                          if opts.compile and opts.stage == "mtd" else None)

    # ---- state -------------------------------------------------------------------------------------------
    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.models if self.opts.stage != "vae-image" else self._with_image_vae(self.trainable),
                        self.run_dir / "models.safetensors")
        optimizer = self.optimizer.state_dict()
        for g in optimizer["param_groups"]:  # plain numbers, loadable by any optimizer settings
            g["lr"] = float(g["lr"])
        state = {"stage": self.opts.stage, "step": self.step, "optimizer": optimizer,
                 "ema": self.ema, "rng": self.rng.bit_generator.state, "torch_rng": self.torch_gen.get_state()}
        with atomic_output(self.run_dir / "state.pt") as tmp:
            torch.save(state, tmp)

    def resume(self) -> bool:
        path = self.run_dir / "state.pt"
        if not path.is_file():
            return False
        # weights_only: tensors, numbers, strings and containers only; a state file never runs code when loaded.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["stage"] != self.opts.stage or state.get("done"):
            return False
        if self.opts.stage == "vae-image":  # models.safetensors holds the image VAE's weights mid-stage
            self.net.load_state_dict({k: v for k, v in self.models.vae.state_dict().items()
                                      if k in self.net.state_dict()})
        for g in state["optimizer"]["param_groups"]:  # this trainer's kernel settings, whatever wrote the state
            g.update(self._adam)
        self.optimizer.load_state_dict(state["optimizer"])
        if self._lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = self._lr
        self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
        self.step = state["step"]
        self.rng.bit_generator.state = state["rng"]
        self.torch_gen.set_state(state["torch_rng"])
        return True

    def _with_image_vae(self, params: dict[str, torch.Tensor]) -> NuwaModels:
        """The models with the image VAE's spatial weights copied in (temporal layers stay identity / zero)."""
        vae_state = self.models.vae.state_dict()
        with torch.no_grad():
            for k, v in params.items():
                vae_state[k].copy_(v)
        return self.models

    def finish(self) -> NuwaModels:
        """The stage's EMA weights become the run's models; the stage is marked done."""
        with torch.no_grad():
            if self.opts.stage == "vae-image":
                self._with_image_vae(self.ema)
            else:
                named = dict(self.models.named_parameters())
                for k, v in self.ema.items():
                    named[k].copy_(v)
            if self.opts.stage == "vae-temporal":
                std = latent_std(self.models.vae, self.corpus, self.L, self.opts)
                self.models.config = dataclasses.replace(
                    self.models.config, vae=dataclasses.replace(self.models.config.vae, scaling_factor=1.0 / std))
        save_checkpoint(self.models, self.run_dir / "models.safetensors")
        with atomic_output(self.run_dir / "state.pt") as tmp:
            torch.save({"stage": self.opts.stage, "step": self.step, "done": True}, tmp)
        return self.models

    # ---- steps -------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.opts.warmup))
        return self.opts.lr * warm * (0.55 + 0.45 * math.cos(math.pi * min(1.0, step / self.opts.steps)))

    def loss(self) -> torch.Tensor:
        opts, corpus, L = self.opts, self.corpus, self.L
        if opts.stage == "vae-image":
            frames = []
            for _ in range(opts.batch):
                v = corpus.pick(self.rng)
                frames.append(corpus.pixels(v, [int(self.rng.integers(corpus.lengths[v]))]))
            return self._vae_loss(torch.stack(frames))  # (B, 1, 3, H, W)
        if opts.stage == "vae-temporal":
            return self._vae_loss(torch.stack([corpus.pixels(*vae_clip(corpus, L, opts, self.rng))
                                               for _ in range(opts.batch)]))
        return self._mtd_loss()

    def _vae_loss(self, video: torch.Tensor) -> torch.Tensor:
        mean, logvar = self.net.encode(video)
        z = mean + torch.randn(mean.shape, generator=self.torch_gen, device=self.device) * torch.exp(0.5 * logvar)
        recon = self.net.decode(z).float()
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).sum() / video.shape[0]
        return F.l1_loss(recon, video) + F.mse_loss(recon, video) + self.opts.kl_weight * kl

    def _mtd_loss(self) -> torch.Tensor:
        return self._loss_of(self._draw_mtd())

    def _loss_of(self, batch: MtdBatch) -> torch.Tensor:
        """`_mtd_loss_of`, compiled if asked (then in fixed shapes, one compilation for every step)."""
        if self.blank is None:  # the T-KLVAE is frozen in this stage: one encoding of an all-zero clip serves all
            res = self.models.config.resolution
            with torch.no_grad():
                self.blank = self.models.vae.encode(torch.zeros((1, self.L, 3, res, res), device=self.device))[0]
        if self._compiled is None:
            return self._mtd_loss_of(batch)
        return self._compiled(dataclasses.replace(batch, given_rows=None))

    def _draw_mtd(self, into: MtdBatch | None = None) -> MtdBatch:
        """The next step's clips and noise; into `into`'s buffers when given (a CUDA graph's inputs)."""
        opts, corpus, L, gen, dev = self.opts, self.corpus, self.L, self.torch_gen, self.device
        picks = [mtd_clip(corpus, L, opts, self.rng) for _ in range(opts.batch)]
        host = np.zeros((2, len(picks), L), np.int64)
        for b, (v, clip) in enumerate(picks):
            host[0, b] = corpus.offsets[v] + np.asarray(clip.positions)
            host[1, b, list(clip.cond_slots)] = 1
        B = len(picks)
        if into is None:
            return MtdBatch(torch.from_numpy(host).to(dev),
                            torch.rand((B, L), generator=gen, device=dev),
                            torch.randint(0, self.schedule.num_train_timesteps, (B,), generator=gen, device=dev),
                            torch.randn(self._latents_shape(B), generator=gen, device=dev),
                            [bool(clip.cond_slots) for _, clip in picks])
        self._staged.synchronize()  # the previous step's copy has left the pinned buffer
        self._pinned.numpy()[:] = host
        into.clips.copy_(self._pinned, non_blocking=True)
        self._staged.record()
        torch.rand((B, L), generator=gen, out=into.drop)  # the same draws, in the same order, as eager steps
        torch.randint(0, self.schedule.num_train_timesteps, (B,), generator=gen, out=into.t)
        torch.randn(self._latents_shape(B), generator=gen, out=into.eps)
        return into

    def _latents_shape(self, clips: int) -> tuple[int, ...]:
        """(B, L, c, h, w): the MTD's latents (and noise) for `clips` clips."""
        cfg = self.models.config
        return (clips, self.L, cfg.unet.latent_channels, cfg.latent_size, cfg.latent_size)

    def _mtd_loss_of(self, batch: MtdBatch) -> torch.Tensor:
        opts, corpus, models = self.opts, self.corpus, self.models
        video = corpus.pixels_at(batch.clips[0])  # (B, L, 3, H, W)
        given = batch.clips[1].float()[:, :, None, None, None]  # (B, L, 1, 1, 1)
        mask = given.expand(-1, -1, 1, *video.shape[-2:]).contiguous()
        scale = models.config.vae.scaling_factor
        with torch.no_grad():  # x0 = T-KLVAE(v0); x0^c = T-KLVAE(v0 with non-condition frames zeroed) (sec. 3.2)
            x0 = models.vae.encode(video)[0] * scale
            rows = batch.given_rows if batch.given_rows is not None else batch.clips[1].bool().any(1)
            cond = condition_latents(models.vae, video, mask, rows, self.blank) * scale
            latent_mask = given.expand(-1, -1, 1, *x0.shape[-2:]).contiguous()
        ids = corpus.caption_ids[batch.clips[0]]  # (B, L)
        ids = torch.where(batch.drop < opts.prompt_dropout, torch.full_like(ids, corpus.empty), ids)
        context = models.text(corpus.tokens[ids.flatten()]).unflatten(0, ids.shape)  # (B, L, 77, d)
        x_t = self.schedule.add_noise(x0.float(), batch.eps, batch.t, self._alphas)  # fp32 even under bf16 autocast
        pred = models.unet(x_t, batch.t, context, cond, latent_mask)
        return F.mse_loss(pred.float(), batch.eps)

    def _update(self, loss: torch.Tensor) -> None:
        """Backward, clipping, optimizer and EMA for one step's loss; no host synchronisation (CUDA-graph safe)."""
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable.values(), 1.0)
        self.optimizer.step()
        with torch.no_grad():  # ema += (1 - decay) (p - ema)
            params = [p.detach() for p in self.trainable.values()]
            ema = list(self.ema.values())
            diff = torch._foreach_sub(params, ema)
            torch._foreach_mul_(diff, self._ema_weight)
            torch._foreach_add_(ema, diff)
            self._loss_sum += loss.detach().float()

    def _eager_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp if self.amp is not None else torch.enable_grad():
            loss = self.loss()
        self._update(loss)

    def _graph_step(self) -> None:
        """One step as a CUDA-graph replay; the first `GRAPH_WARMUP_STEPS` run eagerly on the graph's inputs, the
        next one captures the graph first. Runs on the current (side) stream."""
        if self._graph is None:
            if self._eager_graph_steps == 0:
                B, L = self.opts.batch, self.L
                self._pinned = torch.zeros((2, B, L), dtype=torch.int64).pin_memory()
                self._staged = torch.cuda.Event()
                self._staged.record()
                self._inputs = MtdBatch(torch.zeros((2, B, L), dtype=torch.int64, device=self.device),
                                        torch.zeros((B, L), device=self.device),
                                        torch.zeros((B,), dtype=torch.int64, device=self.device),
                                        torch.zeros(self._latents_shape(B), device=self.device))
            batch = self._draw_mtd(self._inputs)
            # autocast's weight-cast cache must not outlive a step: under a graph the weights change every replay
            amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
            if self._eager_graph_steps < GRAPH_WARMUP_STEPS:
                self._eager_graph_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                with amp:
                    loss = self._loss_of(batch)
                self._update(loss)
                return
            self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=torch.cuda.current_stream(),
                                      capture_error_mode=CAPTURE_ERROR_MODE):
                    with amp:
                        loss = self._loss_of(batch)
                    self._update(loss)
            except RuntimeError as e:  # at step GRAPH_WARMUP_STEPS of this call: nothing to lose by stopping
                raise RuntimeError(f"the MTD training step could not be captured as a CUDA graph ({e}); run again "
                                   f"with {option('cuda_graphs', False, cli_value=None)} (eager steps, slower)") from e
            self._graph = graph
        else:
            self._draw_mtd(self._inputs)
        self._graph.replay()

    def _mean_loss(self, keep: bool = False) -> float:
        """The mean loss of the steps since the last call (the host waits for them here, not at every step);
        a non-finite one stops training before anything is saved. `keep`: check only, do not start a new mean."""
        if not self._loss_steps:
            return float("nan") if self.last_loss is None else self.last_loss
        mean = float(self._loss_sum) / self._loss_steps
        if not math.isfinite(mean):
            raise FloatingPointError(f"non-finite loss in steps {self.step - self._loss_steps + 1}-{self.step} of "
                                     f"{self.opts.stage} (the run folder keeps its last save); lower "
                                     f"{option('lr')}")
        if not keep:
            self._loss_sum.zero_()
            self._loss_steps = 0
        return mean

    def _loop(self, bar, log) -> bool:
        """Steps until the stage's end or the time limit; True if paused there."""
        opts, t0 = self.opts, time.perf_counter()
        paused = False
        while self.step < opts.steps:
            if opts.time_limit_s is not None and time.perf_counter() - t0 > opts.time_limit_s:
                bar.write(f"time limit reached at step {self.step} of {opts.steps}: "
                          + ("saved; run the same command again to resume" if opts.at_limit == "pause"
                             else "finishing the stage early"))
                paused = opts.at_limit == "pause"
                break
            if self._lr is not None:  # fill_: ordered on the stream before the replay that reads it
                self._lr.fill_(self.lr_at(self.step))
            else:
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr_at(self.step)
            self._ema_weight.fill_(1 - min(opts.ema, (1 + self.step) / (10 + self.step)))
            self._graph_step() if self.graphs else self._eager_step()
            self.step += 1
            self._loss_steps += 1
            bar.update()
            if self.step % opts.log_every == 0 or self.step == opts.steps:
                rec = {"stage": opts.stage, "step": self.step, "loss": self._mean_loss(),
                       "lr": self.lr_at(self.step - 1), "seconds": round(time.perf_counter() - t0, 2)}
                log.write(json.dumps(rec) + "\n")
                self.last_loss = rec["loss"]
                log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if self.step % opts.save_every == 0 and self.step < opts.steps:
                self._mean_loss(keep=True)
                self.save()
        self._mean_loss(keep=True)  # nothing non-finite is saved or finished
        return paused

    def train(self) -> NuwaModels | None:
        """Run the stage to its end (returns the final models) or, at the time limit with at_limit='pause', save
        the state and return None."""
        opts = self.opts
        resumed = self.resume()
        for m in (self.net, self.models):
            m.train()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = (self.run_dir / "log.jsonl").open("a", encoding="utf-8")
        bar = tqdm(total=opts.steps, initial=self.step, desc=opts.stage, unit="step", disable=not self.progress)
        if resumed:
            bar.write(f"resuming {opts.stage} at step {self.step}")
        # Under CUDA graphs the loop runs on a side stream (a graph cannot be captured on the default one)
        side = torch.cuda.Stream(self.device) if self.graphs else None
        try:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                paused = self._loop(bar, log)
        finally:
            if side is not None:  # what follows (saving, exporting) reads the weights on the default stream
                torch.cuda.current_stream(self.device).wait_stream(side)
            bar.close()
            log.close()
            for m in (self.net, self.models):
                m.eval()
        if paused:
            self.save()
            return None
        return self.finish()


def load_run(run_dir: str | Path, init: NuwaModels, device: torch.device) -> NuwaModels:
    """The run's current weights if the folder has them, else `init`."""
    path = Path(run_dir) / "models.safetensors"
    models = load_checkpoint(path) if path.is_file() else init
    return models.float().to(device)


def write_summary(run_dir: str | Path, stage: str, summary: dict) -> None:
    path = Path(run_dir) / "summary.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[stage] = summary
    write_text(path, json.dumps(data, indent=1))


@torch.no_grad()
def recon_psnr(vae: TKLVAE, corpus: Corpus, L: int, clips: int = 32, seed: int = 123) -> float:
    """Mean PSNR (dB, pixels in [-1, 1] mapped to [0, 1]) of T-KLVAE reconstructions of held-out clips."""
    psnrs = []
    for video in clip_batches(corpus, L, TrainOptions("vae-temporal", 1), seed, clips):
        recon = vae.decode(vae.encode(video)[0]).float().clamp(-1, 1)
        mse = ((recon - video) / 2).pow(2).flatten(1).mean(1)
        psnrs += (-10 * torch.log10(mse.clamp_min(1e-10))).tolist()
    return float(np.mean(psnrs))


def run_stage(run_dir: str | Path, opts: TrainOptions, videos: list[CorpusVideo], holdout: list[CorpusVideo],
              init: NuwaModels, device: torch.device, progress: bool = True) -> dict:
    """Train one stage in `run_dir` (resuming it if unfinished) and record its summary."""
    models = load_run(run_dir, init, device)
    corpus = Corpus(videos, models, device)
    trainer = Trainer(run_dir, models, corpus, opts, device, progress)
    t0 = time.perf_counter()
    models = trainer.train()
    if models is None:
        return {"paused_at_step": trainer.step, "of": opts.steps, "stage": opts.stage}
    summary = {"steps": trainer.step, "seconds": round(time.perf_counter() - t0, 1),
               "options": dataclasses.asdict(opts),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    summary["final_loss"] = trainer.last_loss  # of this call (a resumed stage logged earlier ones in log.jsonl)
    if opts.stage.startswith("vae"):  # Table 2a: reconstruction without (image KL-VAE) and with temporal layers
        summary["holdout_recon_psnr_db"] = recon_psnr(models.vae, Corpus(holdout, models, device),
                                                      models.config.frames_per_call)
        summary["scaling_factor"] = models.config.vae.scaling_factor
    write_summary(run_dir, opts.stage, summary)
    return summary
