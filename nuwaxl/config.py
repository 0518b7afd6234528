"""Typed model configuration and named presets: the one source of truth for shapes.

Layout convention everywhere: (B, L, C, H, W) with L = frames of one diffusion call.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from nuwaxl.errors import UserError, option

# Reverse-process samplers (nuwaxl.diffusion): DDIM, DDPM ancestral (Eq. 16), DPM-Solver++(2M). The CLI's choices
# and the request check read SAMPLERS.
SamplerName = Literal["ddim", "ddpm", "dpmpp-2m"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
MIN_FRAMES_PER_CALL = 3  # local diffusion keeps a first and a last frame and generates at least one between
# Longer videos need `allow_large` (CLI: --yes or a confirmation): one full depth-3 tree of L=16, the length of
# the paper's training videos. A million frames would otherwise start a depth-6 plan of 66,667 calls unasked.
LARGE_VIDEO_FRAMES = 3376


def from_fields(kind, values: dict, what: str):
    """A dataclass from its JSON form (lists become tuples); unknown names fail with the likely reason."""
    unknown = set(values) - {f.name for f in dataclasses.fields(kind)}
    if unknown:
        raise UserError(f"unknown {what} {sorted(unknown)}: written by a newer trt-nuwaxl?")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class VAEConfig:
    """T-KLVAE (paper section 3.1): an LDM KL autoencoder with temporal layers (Eq. 1-2)."""

    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)  # one per resolution; len-1 downsamplings
    num_res_blocks: int = 2
    norm_groups: int = 32
    temporal: bool = True  # False gives the image KLVAE of Table 2a
    scaling_factor: float = 0.18215  # latents are scaled to ~unit variance before diffusion (LDM)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class UNetLayerPlan:
    """One UNet layer: its block, its resolution level (channels `channels[level]`, latent size / 2**level), and
    whether it has attention (SA/PA/TA) and the visual-condition injection."""

    block: Literal["down", "mid", "up"]
    level: int
    attention: bool
    inject: bool


@dataclass(frozen=True)
class UNetConfig:
    """Mask 3D-UNet (paper section 3.2)."""

    latent_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    attention: tuple[bool, ...] = (True, True, True, False)  # SA/PA/TA at each resolution
    num_heads: int = 8
    context_dim: int = 768
    norm_groups: int = 32
    inject_multiscale: bool = True  # MI: visual condition at every scale, else only the highest
    inject_symmetric: bool = True  # SI: in down and up blocks, else only in up blocks
    temporal: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def layer_plan(self) -> tuple[UNetLayerPlan, ...]:
        """Every UNet layer in execution order (down, mid, up): the one source for building the network and for
        the shapes of its step-invariant tensors (`nuwaxl.iospec`)."""
        n = len(self.channels)

        def injected(level: int, up: bool) -> bool:
            return (up or self.inject_symmetric) and (self.inject_multiscale or level == 0)

        down = [UNetLayerPlan("down", i, self.attention[i], injected(i, up=False))
                for i in range(n) for _ in range(self.num_res_blocks)]
        # the mid block is neither up nor highest: injected only with both MI and SI
        mid = [UNetLayerPlan("mid", n - 1, True, self.inject_multiscale and self.inject_symmetric),
               UNetLayerPlan("mid", n - 1, False, False)]
        up = [UNetLayerPlan("up", i, self.attention[i], injected(i, up=True))
              for i in reversed(range(n)) for _ in range(self.num_res_blocks + 1)]
        return tuple(down + mid + up)




@dataclass(frozen=True)
class TextConfig:
    """CLIP text encoder (transformers' CLIPTextModel architecture)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_length: int = 77


@dataclass(frozen=True)
class DiffusionConfig:
    """DDPM forward process (Eq. 3-4), epsilon prediction."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings a checkpoint recommends for its own weights (like transformers' generation config);
    a request's explicit values win. Carried in checkpoint metadata and engine manifests, not in ModelConfig:
    they change no shapes and no engine."""

    guidance_scale: float = 1.0  # classifier-free guidance; 1 = off
    num_inference_steps: int = 25
    sampler: SamplerName = "ddim"

    def __post_init__(self) -> None:
        check_guidance_scale(self.guidance_scale)
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int) \
                or self.num_inference_steps < 1:
            raise UserError(f"recommended num_inference_steps {self.num_inference_steps!r} must be a whole number >= 1")
        if self.sampler not in SAMPLERS:
            raise UserError(f"recommended sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SamplingDefaults:
        return from_fields(cls, d, "sampling defaults")


def check_guidance_scale(value: object) -> None:
    """A finite number >= 1 (NaN or infinity would run a whole generation and end in non-finite frames)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1.0 <= value < math.inf:
        raise UserError(f"{option('guidance_scale', value)} must be a finite number >= 1 (1 disables guidance)")


@dataclass(frozen=True)
class TrainingRecord:
    """What a set of weights was trained on, as far as it is known: carried in checkpoint metadata and engine
    manifests, so that generation can say when a request leaves what the weights know."""

    trained: bool = True  # False: random initialisation (a preset's weights, for tests and speed runs)
    resolution: int | None = None  # frame size of the training data in px; None: unknown
    words: tuple[str, ...] = ()  # the training captions' vocabulary, lower case, sorted; (): unknown
    story_version: int | None = None  # procedural stories trained on (nuwaxl.train.data); None: unknown or own videos
    # share of the MTD's training clips that were autoregressive (consecutive frames, the first given); 1.0: the
    # paper's FDM* baseline, trained on short clips only; None: unknown
    ar_fraction: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainingRecord:
        return from_fields(cls, d, "training record fields")


RANDOM_WEIGHTS = TrainingRecord(trained=False)


@dataclass(frozen=True)
class WeightsCard:
    """What is known of a set of weights without loading them, read once from a checkpoint's header, an engine
    directory's manifest or a preset: enough to check a request before any model work."""

    source: str  # how the user named them: "checkpoint PATH", "engines DIR", "preset NAME"
    config: ModelConfig
    sampling: SamplingDefaults
    trained_on: TrainingRecord
    tokenizer_json: str
    frames_per_call: int | None = None  # fixed by built engines
    precision: str | None = None  # fixed by built engines


@dataclass(frozen=True)
class ModelConfig:
    name: str
    resolution: int = 128  # pixels, square frames
    frames_per_call: int = 16  # L
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae.downsample_factor

    def with_resolution(self, resolution: int) -> ModelConfig:
        return dataclasses.replace(self, resolution=resolution)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        parts = {name: from_fields(kind, d.pop(name, {}), f"{kind.__name__} fields")
                 for name, kind in (("vae", VAEConfig), ("unet", UNetConfig), ("text", TextConfig),
                                    ("diffusion", DiffusionConfig))}
        return cls(**d, **parts)


def check_frames_per_call(frames_per_call: int) -> None:
    """The one home of the rule on L, for configs, plans and training clips."""
    if frames_per_call < MIN_FRAMES_PER_CALL:
        raise UserError(f"frames per call L={frames_per_call} is too small: local diffusion needs L >= "
                        f"{MIN_FRAMES_PER_CALL} (a first, a middle and a last frame); use "
                        f"{option('frames_per_call', MIN_FRAMES_PER_CALL)} or more")


def validate(cfg: ModelConfig) -> None:
    """All shape rules in one place; each error says the value and the fix."""
    factor = cfg.vae.downsample_factor
    if cfg.resolution <= 0 or cfg.resolution % factor:
        raise UserError(
            f"resolution {cfg.resolution} px is not divisible by the VAE factor {factor}; "
            f"use a multiple of {factor} (for example {max(factor, cfg.resolution // factor * factor)})"
        )
    need = factor * cfg.unet.downsample_factor
    if cfg.resolution % need:
        raise UserError(
            f"resolution {cfg.resolution} px gives {cfg.latent_size}x{cfg.latent_size} latents, which the UNet's "
            f"{len(cfg.unet.channels) - 1} downsamplings cannot halve evenly; use a multiple of {need} px"
        )
    check_frames_per_call(cfg.frames_per_call)
    if len(cfg.unet.attention) != len(cfg.unet.channels):
        raise UserError(
            f"unet.attention has {len(cfg.unet.attention)} entries but unet.channels has {len(cfg.unet.channels)}; "
            "give one flag per resolution"
        )
    for what, chans, groups in (("vae", cfg.vae.channels, cfg.vae.norm_groups),
                                ("unet", cfg.unet.channels, cfg.unet.norm_groups)):
        bad = [c for c in chans if c % groups]
        if bad:
            raise UserError(f"{what}.channels {bad} are not divisible by {what}.norm_groups={groups}")
    bad = [c for c in cfg.unet.channels if c % cfg.unet.num_heads]
    if bad:
        raise UserError(f"unet.channels {bad} are not divisible by unet.num_heads={cfg.unet.num_heads}")
    if cfg.text.hidden_size % cfg.text.num_heads:
        raise UserError(f"text.hidden_size {cfg.text.hidden_size} is not divisible by text.num_heads")


PRESETS: dict[str, ModelConfig] = {
    # Tests: a few thousand parameters, 32 px frames, 4x4 latents.
    "tiny": ModelConfig(
        name="tiny",
        resolution=32,
        frames_per_call=16,
        vae=VAEConfig(channels=(8, 8, 16, 16), num_res_blocks=1, norm_groups=4),
        unet=UNetConfig(channels=(16, 32), num_res_blocks=1, attention=(True, True), num_heads=2,
                        context_dim=32, norm_groups=4),
        text=TextConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
    ),
    # CPU-friendly default: 64 px frames, 8x8 latents; small enough to ship trained in <= 20 MiB (fp16).
    "small": ModelConfig(
        name="small",
        resolution=64,
        frames_per_call=16,
        vae=VAEConfig(channels=(32, 48, 64, 64), num_res_blocks=1, norm_groups=16),
        unet=UNetConfig(channels=(64, 96, 128), num_res_blocks=1, attention=(True, True, True), num_heads=4,
                        context_dim=128, norm_groups=16),
        text=TextConfig(vocab_size=4096, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4),
    ),
    # The scale NUWA-XL builds on: Stable-Diffusion-1.x-sized latent UNet + SD VAE + CLIP ViT-L/14 text encoder,
    # 16 frames per call, 128 px -> 16x16 latents (256 px -> 32x32). About 1 B UNet parameters with temporal layers.
    "paper": ModelConfig(name="paper"),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
