"""The engine directory: a self-describing artifact written by `trt-nuwaxl build`, read by `generate --engines`.

    DIR/engines.json          backend, precision, batch range, frames and resolution, model config, provenance,
                              one IOSpec per network, stage timings, library versions (written last: a directory
                              without it is an incomplete build)
    DIR/tokenizer.json        the prompt tokenizer
    DIR/checkpoint.safetensors  the weights the engines came from (parity reference; torch eager/compile modes)
    DIR/onnx/NET.onnx(.data)  exported networks + NET.json export manifest with measured parity
    DIR/tensorrt/NET.plan     TensorRT plans + NET.json (cache key, target GPUs, I/O read back from TensorRT)
    DIR/torch/NET.pt2         AOTInductor packages + NET.json (parity)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nuwaxl.config import ModelConfig, SamplingDefaults
from nuwaxl.engine.base import EngineNetworks, NetworkSpec
from nuwaxl.errors import UserError
from nuwaxl.iospec import NETWORKS, IOSpec
from nuwaxl.tokenizer import PromptTokenizer

FORMAT, FORMAT_VERSION, MANIFEST = "nuwaxl-engines", 1, "engines.json"
BACKENDS = ("tensorrt", "onnxruntime", "torch")
TORCH_MODES = ("aoti", "eager", "compile", "cudagraph", "compile-cudagraph")


def read_manifest(directory: str | Path) -> dict:
    d = Path(directory)
    fix = f"build one with: trt-nuwaxl build --preset small --backend onnxruntime --out {d}"
    if not d.is_dir():
        raise UserError(f"engine directory not found: {d}; {fix}")
    path = d / MANIFEST
    if not path.is_file():
        raise UserError(f"{d} has no {MANIFEST}: not an engine directory, or an interrupted build; {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); rebuild with trt-nuwaxl build --force --out {d}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is format {manifest.get('format')!r} v{manifest.get('format_version')}, this "
                        f"trt-nuwaxl reads {FORMAT!r} v{FORMAT_VERSION}; rebuild with trt-nuwaxl build --force")
    missing = [n for n in NETWORKS if n not in manifest.get("networks", {})]
    if missing or manifest.get("backend") not in BACKENDS:
        raise UserError(f"{path} lacks networks {missing} or names an unknown backend; rebuild with --force")
    return manifest


def load_engines(directory: str | Path, device: str | None = None, torch_mode: str = "aoti") -> EngineNetworks:
    """Open every engine of a directory on `device` (default: the one it was built for)."""
    from nuwaxl.engine.torch_backend import resolve_device

    d = Path(directory)
    m = read_manifest(d)
    config = ModelConfig.from_dict(m["model_config"])
    backend, precision = m["backend"], m["precision"]
    dev = resolve_device(device or m["device"])
    dtype = torch.float16 if precision == "fp16" else torch.float32
    specs = {n: IOSpec.from_dict(m["networks"][n]["io_spec"]) for n in NETWORKS}
    if torch_mode not in TORCH_MODES:
        raise UserError(f"unknown torch mode {torch_mode!r}; use one of {', '.join(TORCH_MODES)}")
    if backend == "torch" and torch_mode != "aoti":  # live modules from the directory's checkpoint
        from nuwaxl.engine.torch_backend import from_checkpoint

        return from_checkpoint(d / "checkpoint.safetensors", device=str(dev), precision=precision,
                               resolution=config.resolution, mode=torch_mode)
    if backend == "onnxruntime":
        from nuwaxl.engine.onnxruntime_backend import OrtEngine

        engines = {n: OrtEngine(d / "onnx" / f"{n}.onnx", specs[n], dev) for n in NETWORKS}
    elif backend == "tensorrt":
        from nuwaxl.engine.tensorrt_backend import TrtEngine

        engines = {n: TrtEngine(d / "tensorrt" / f"{n}.plan", specs[n], dev) for n in NETWORKS}
    else:
        from nuwaxl.engine.torch_backend import AotiEngine

        if dev.type != m["device_type"]:
            raise UserError(f"the AOTInductor packages in {d} were compiled for {m['device_type']}, not "
                            f"{dev.type}; rebuild on this device or pass --device {m['device_type']}")
        engines = {n: AotiEngine(d / "torch" / f"{n}.pt2", specs[n]) for n in NETWORKS}
    tokenizer = PromptTokenizer((d / "tokenizer.json").read_text(encoding="utf-8"), config.text.max_length)
    sampling = SamplingDefaults.from_dict(m.get("sampling", {}))
    return EngineNetworks(engines, tokenizer, NetworkSpec(config, dev, dtype, m["frames_per_call"], backend, sampling))
