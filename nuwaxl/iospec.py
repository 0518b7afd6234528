"""The one source of truth for network I/O: names, dtypes, named axes and the batch range.

It produces the export sample inputs and ONNX dynamic axes (export/), TensorRT optimization profiles (engine/)
and the runtime's buffers and batch limits. It is plain data, written into every manifest and read back from it,
so later stages never import earlier stages' code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from nuwaxl.config import ModelConfig
from nuwaxl.errors import UserError, option

Precision = Literal["fp16", "fp32"]  # what engines are built in
ENGINE_PRECISIONS: tuple[Precision, ...] = ("fp16", "fp32")
# Every precision the runtime knows, and the element type it stores tensors in (live PyTorch modules also run bf16).
ELEMENT_TYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# The UNet is two networks: `unet_prepare` (once per batch of calls: the condition cascade folded into every
# layer's injection scale and shift, and the prompt keys and values) and `unet_step` (once per denoising step).
NETWORKS = ("text_encoder", "unet_prepare", "unet_step", "vae_encoder", "vae_decoder")
# The only dynamic axis. Its size counts rows: diffusion calls (twice that many rows with classifier-free guidance),
# prompts, or frame chunks; `trt-nuwaxl build --max-rows` bounds it, while the runtime's `max_batch` counts calls.
BATCH = "batch"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: Literal["float16", "float32", "bfloat16", "int64"]
    shape: tuple[int | str, ...]  # BATCH marks the dynamic axis

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else d for d in self.shape)


@dataclass(frozen=True)
class IOSpec:
    network: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_min: int
    batch_opt: int
    batch_max: int

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape per input: a TensorRT optimization profile."""
        return {t.name: (t.concrete(self.batch_min), t.concrete(self.batch_opt), t.concrete(self.batch_max))
                for t in self.inputs}

    def check_batch(self, batch: int) -> None:
        if not self.batch_min <= batch <= self.batch_max:
            raise UserError(f"{self.network}: batch {batch} is outside the built range "
                            f"{self.batch_min}..{self.batch_max}; rebuild the engines with a larger "
                            f"{option('max_rows')}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IOSpec:
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        return cls(d["network"], tensors(d["inputs"]), tensors(d["outputs"]), d["batch_min"], d["batch_opt"],
                   d["batch_max"])


def io_specs(config: ModelConfig, precision: str, max_rows: int, frames_per_call: int | None = None,
             elements_max: int | None = None) -> dict[str, IOSpec]:
    """Specs of the networks generation runs; frames (L) and resolution are fixed per build, the batch axis
    takes 1..max_rows rows, fewer for a network whose largest tensor would pass `elements_max` elements (a
    backend's indexing limit; the runtime splits larger batches)."""
    if max_rows < 1:
        raise UserError(f"{option('max_rows', max_rows)} must be at least 1")
    if precision not in ELEMENT_TYPES:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(ELEMENT_TYPES)}")
    f = ELEMENT_TYPES[precision]
    L = frames_per_call or config.frames_per_call
    c, h, res = config.vae.latent_channels, config.latent_size, config.resolution
    tokens, d_text = config.text.max_length, config.text.hidden_size
    latent = (BATCH, L, c, h, h)  # (B, L, C, H, W)
    video = (BATCH, L, 3, res, res)

    def spec(name, inputs, outputs):
        rows = max_rows
        peak = peak_elements_per_row(config, name, L)
        if elements_max is not None and peak is not None:
            rows = min(rows, elements_max // peak)
            if rows < 1:
                raise UserError(f"{name} holds tensors of {peak} elements per row at {res} px, over this backend's "
                                f"limit of {elements_max}; use a lower resolution or the torch backend")
        return IOSpec(name, tuple(TensorSpec(*t) for t in inputs), tuple(TensorSpec(*t) for t in outputs),
                      1, rows, rows)

    prepared = prepared_tensors(config, f, L)
    return {
        "text_encoder": spec("text_encoder", [("input_ids", "int64", (BATCH, tokens))],
                             [("embeddings", f, (BATCH, tokens, d_text))]),
        "unet_prepare": spec("unet_prepare", [("context", f, (BATCH, L, tokens, d_text)), ("cond", f, latent),
                                              ("mask", f, (BATCH, L, 1, h, h))], prepared),
        "unet_step": spec("unet_step", [("x_t", f, latent), ("timesteps", "int64", (BATCH,)), *prepared],
                          [("eps", f, latent)]),
        "vae_encoder": spec("vae_encoder", [("video", f, video)], [("latents", f, latent)]),
        "vae_decoder": spec("vae_decoder", [("latents", f, latent)], [("video", f, video)]),
    }


def peak_elements_per_row(config: ModelConfig, network: str, frames_per_call: int) -> int | None:
    """The most elements a tensor inside the T-KLVAE networks holds per batch row (L frames): the encoder's
    widest full-resolution activation, and the decoder's upsampled ones (level i's channels at level i-1's
    size). Paper preset, 16 frames: 33.6 M (encoder) and 67.1 M (decoder) per row, so 64 and 32 rows pass 2^31
    (ONNX Runtime's cuDNN convolutions then fail: CUDNN_STATUS_NOT_SUPPORTED, seen on an H200). None for the
    other networks: the UNet works at the latent size (paper: under 9 M per row)."""
    ch, res = config.vae.channels, config.resolution
    if network == "vae_encoder":
        return frames_per_call * max(c * (res // 2 ** i) ** 2 for i, c in enumerate(ch))
    if network == "vae_decoder":
        return frames_per_call * max([ch[0] * res ** 2] + [c * (res // 2 ** (i - 1)) ** 2
                                                            for i, c in enumerate(ch) if i > 0])
    return None


def prepared_tensors(config: ModelConfig, dtype: str, frames_per_call: int) -> list[tuple[str, str, tuple]]:
    """What `unet_prepare` gives `unet_step`, per layer of `UNetConfig.layer_plan` in execution order: the
    injection's scale and shift (B, L, C, h, w) at the layer's resolution, and PA's prompt keys and values
    (B, L, heads, tokens, C / heads)."""
    u, L, tokens = config.unet, frames_per_call, config.text.max_length
    out = []
    for i, p in enumerate(u.layer_plan()):
        c, size = u.channels[p.level], config.latent_size // 2 ** p.level
        if p.inject:
            out += [(f"{kind}_{i}", dtype, (BATCH, L, c, size, size)) for kind in ("scale", "shift")]
        if p.attention:
            out += [(f"{kind}_{i}", dtype, (BATCH, L, u.num_heads, tokens, c // u.num_heads)) for kind in "kv"]
    return out
