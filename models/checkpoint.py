"""The model bundle and its checkpoint: one .safetensors file with the config and tokenizer in its metadata."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nuwaxl.config import RANDOM_WEIGHTS, ModelConfig, SamplingDefaults, TrainingRecord, WeightsCard
from nuwaxl.errors import UserError, option
from nuwaxl.files import atomic_output
from nuwaxl.models.text import PromptEncoder
from nuwaxl.models.unet import MaskUNet3D
from nuwaxl.models.vae import TKLVAE
from nuwaxl.tokenizer import PromptTokenizer, default_tokenizer_json

FORMAT = "nuwaxl-checkpoint"
FORMAT_VERSION = "1"
BUNDLED = "assets/weights/small.safetensors"  # inside the nuwaxl package: the trained default weights


def bundled_checkpoint() -> Path:
    """The trained `small` weights that ship with the package (64 px; see README "Training and quality")."""
    return Path(str(resources.files("nuwaxl").joinpath(BUNDLED)))


class NuwaModels(nn.Module):
    """T-KLVAE + Mask 3D-UNet + prompt encoder, with the config and tokenizer that define them and the sampling
    settings recommended for these weights."""

    def __init__(self, config: ModelConfig, tokenizer_json: str | None = None,
                 sampling: SamplingDefaults | None = None, trained_on: TrainingRecord = RANDOM_WEIGHTS):
        super().__init__()
        self.config = config
        self.sampling = sampling or SamplingDefaults()
        self.trained_on = trained_on  # the trainer replaces it with what it trained on
        self.tokenizer = PromptTokenizer(tokenizer_json or default_tokenizer_json(), config.text.max_length)
        if self.tokenizer.vocab_size > config.text.vocab_size:
            raise UserError(f"tokenizer has {self.tokenizer.vocab_size} tokens but text.vocab_size is "
                            f"{config.text.vocab_size}; raise text.vocab_size")
        self.vae = TKLVAE(config.vae)
        self.unet = MaskUNet3D(config.unet)
        self.text = PromptEncoder(config.text, self.tokenizer.eos, self.tokenizer.pad)

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> NuwaModels:
        """Freshly initialised weights, identical for the same seed and device (paper init: identity/zero temporal
        layers). Initialising on a GPU is much faster for the 1 B-parameter preset, with other numbers than CPU."""
        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(seed)
            return cls(config).eval()

    def num_parameters(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in ("vae", "unet", "text")}


def save_checkpoint(models: NuwaModels, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write atomically: a failed save never leaves a half-written file under the final name."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in models.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": models.config.to_json(),
                "tokenizer": models.tokenizer.json, "sampling": json.dumps(models.sampling.to_dict()),
                "trained_on": json.dumps(models.trained_on.to_dict())}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; give {option('path', cli_value='PATH')} a .safetensors file "
                        f"written by trt-nuwaxl, or use {option('preset', 'NAME')} for random weights")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is not a readable safetensors file ({e}); "
                        "re-download or re-save it") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise UserError(f"checkpoint {path} carries no trt-nuwaxl config in its metadata; "
                        "save it with nuwaxl.models.checkpoint.save_checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format version {meta.get('format_version')}, this trt-nuwaxl reads "
                        f"{FORMAT_VERSION}; upgrade trt-nuwaxl or re-save the checkpoint")
    return meta


def _config(path, meta: dict[str, str]) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(meta["config"]))
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"checkpoint {path} has a malformed config ({e})") from None


def _sampling(path, meta: dict[str, str]) -> SamplingDefaults:
    try:
        return SamplingDefaults.from_dict(json.loads(meta.get("sampling", "{}")))
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"checkpoint {path} has malformed sampling defaults ({e})") from None


def _trained_on(path, meta: dict[str, str]) -> TrainingRecord:
    if "trained_on" not in meta:  # written before training records existed: trained, on what is not known
        return TrainingRecord()
    try:
        return TrainingRecord.from_dict(json.loads(meta["trained_on"]))
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"checkpoint {path} has a malformed training record ({e})") from None


def read_card(path: str | os.PathLike) -> WeightsCard:
    """What the checkpoint says of itself, from its header alone: cheap, for checking a request before loading
    weights."""
    meta = read_metadata(path)
    config = _config(path, meta)
    return WeightsCard(f"checkpoint {path}", config, _sampling(path, meta), _trained_on(path, meta),
                       meta.get("tokenizer") or default_tokenizer_json())


def preset_card(name: str) -> WeightsCard:
    """A preset's random weights: its config, no sampling recommendation, the default tokenizer."""
    from nuwaxl.config import preset

    return WeightsCard(f"preset {name}", preset(name), SamplingDefaults(), RANDOM_WEIGHTS, default_tokenizer_json())


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The checkpoint's config from its header alone."""
    return read_card(path).config


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> NuwaModels:
    meta = read_metadata(path)
    config = _config(path, meta)
    models = NuwaModels(config, meta.get("tokenizer"), _sampling(path, meta), _trained_on(path, meta))
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} is corrupt ({e}); re-download or re-save it") from None
    expected = models.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match its own config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    bad = [k for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise UserError(f"checkpoint {path} has tensors of the wrong shape for its config: {bad[:5]}")
    # Scrambled bytes decode to NaN or infinity in some values; trained weights have none. Found here, they stop
    # the run before any generation instead of ending it in black frames.
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"checkpoint {path} has non-finite values (NaN or infinity) in {len(bad)} tensors, for "
                        f"example {bad[0]}: the file is corrupt; re-download or re-save it")
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    models.load_state_dict(state)
    return models.to(device=device, dtype=dtype).eval()


def with_sampling(path: str | os.PathLike, out: str | os.PathLike, trained_on: TrainingRecord | None = None,
                  **defaults) -> Path:
    """Copy a checkpoint (same weights, same dtype) recommending other sampling settings, e.g. the guidance scale
    its evaluation chose: `with_sampling("run/small-fp16.safetensors", "small.safetensors", guidance_scale=3.0)`;
    `trained_on` replaces its training record."""
    models = load_checkpoint(path)
    models.sampling = SamplingDefaults.from_dict({**models.sampling.to_dict(), **defaults})
    if trained_on is not None:
        models.trained_on = trained_on
    dtype = next(p.dtype for p in models.parameters())
    return save_checkpoint(models, out, dtype=dtype)
