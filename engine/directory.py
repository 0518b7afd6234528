"""The engine directory: a self-describing artifact written by `trt-nuwaxl build`, read by `generate --engines`.

    DIR/engines.json          format v3: backend, precision, row range, frames and resolution, model config,
                              the weights' source (a checkpoint's path, size and sha256, or a preset and
                              seed: never a copy), their sampling defaults and training record, one IOSpec and the
                              file sizes per network, stage timings, library versions (written last: a directory
                              without it is an incomplete build; loading checks files and specs against it)
    DIR/tokenizer.json        the prompt tokenizer
    DIR/onnx/NET.onnx(.data)  exported networks + NET.json export manifest with measured parity
    DIR/tensorrt/NET.plan     TensorRT plans + NET.json (cache key, target GPUs, I/O read back from TensorRT)
    DIR/torch/NET.pt2         AOTInductor packages (code only) + NET.safetensors (the weights every package of
                              NET shares) + NET.json (parity); NET.rows<N>.pt2: static packages for the
                              row counts where the time goes (torch_backend.STATIC_ROWS)

NET is each of `nuwaxl.iospec.NETWORKS`: the UNet is two networks, `unet_prepare` and `unet_step`.
"""

from __future__ import annotations

import json
from pathlib import Path

from nuwaxl.config import ModelConfig, SamplingDefaults, TrainingRecord, WeightsCard
from nuwaxl.dtypes import torch_dtype
from nuwaxl.engine.base import EngineNetworks, NetworkSpec
from nuwaxl.engine.graphs import GraphedEngine
from nuwaxl.engine.registry import BACKENDS, ENGINE_TORCH_MODES, backend_module
from nuwaxl.errors import UserError, option
from nuwaxl.iospec import NETWORKS, IOSpec, io_specs
from nuwaxl.tokenizer import PromptTokenizer

FORMAT, FORMAT_VERSION, MANIFEST = "nuwaxl-engines", 3, "engines.json"
# What changed in each format version, for the "rebuild" message an older directory gets.
FORMAT_CHANGES = {3: "the UNet is two networks now (unet_prepare once per batch of calls, unet_step per step)"}


def build_hint(directory: str | Path) -> str:
    """How to make an engine directory here: from the bundled trained weights (not a preset's random ones)."""
    return f"build one with: trt-nuwaxl build --backend onnxruntime --precision fp32 --out {directory}"


def read_manifest(directory: str | Path) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"engine directory not found: {d}; {build_hint(d)}")
    path = d / MANIFEST
    if not path.is_file():
        raise UserError(f"{d} has no {MANIFEST}: not an engine directory, or an interrupted build; {build_hint(d)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); rebuild with trt-nuwaxl build --force --out {d}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is format {manifest.get('format')!r} v{manifest.get('format_version')}, this "
                        f"trt-nuwaxl reads {FORMAT!r} v{FORMAT_VERSION} ({FORMAT_CHANGES[FORMAT_VERSION]}); rebuild "
                        f"with trt-nuwaxl build --force --out {d}")
    missing = [n for n in NETWORKS if n not in manifest.get("networks", {})]
    if missing or manifest.get("backend") not in BACKENDS:
        raise UserError(f"{path} lacks networks {missing} or names an unknown backend; rebuild with "
                        "trt-nuwaxl build --force")
    return manifest


def trained_on(manifest: dict) -> TrainingRecord:
    return TrainingRecord.from_dict(manifest.get("trained_on", {}))


def read_card(directory: str | Path) -> WeightsCard:
    """What an engine directory says of its weights, from its manifest alone (no engine is opened)."""
    return card_from_manifest(directory, read_manifest(directory))


def card_from_manifest(directory: str | Path, manifest: dict) -> WeightsCard:
    d = Path(directory)
    config = ModelConfig.from_dict(manifest["model_config"])
    tokenizer = d / "tokenizer.json"
    if not tokenizer.is_file():
        raise UserError(f"{tokenizer} is missing; rebuild with trt-nuwaxl build --force --out {d}")
    return WeightsCard(f"engines {d}", config, SamplingDefaults.from_dict(manifest.get("sampling", {})),
                       trained_on(manifest), tokenizer.read_text(encoding="utf-8"), manifest["frames_per_call"],
                       manifest["precision"])


def check_files(directory: Path, manifest: dict) -> dict[str, IOSpec]:
    """Engine files against their manifest: present, of the recorded size, and I/O specs that the manifest's own
    model config gives. A mismatch means the directory was edited or damaged after the build."""
    config = ModelConfig.from_dict(manifest["model_config"])
    stored = {n: IOSpec.from_dict(manifest["networks"][n]["io_spec"]) for n in NETWORKS}
    expected = io_specs(config, manifest["precision"], manifest["max_rows"], manifest["frames_per_call"],
                        manifest.get("tensor_elements_max"))
    fix = f"rebuild with trt-nuwaxl build --force --out {directory}"
    for name in NETWORKS:
        if stored[name] != expected[name]:
            got = {t.name: t.shape for t in stored[name].inputs + stored[name].outputs}
            want = {t.name: t.shape for t in expected[name].inputs + expected[name].outputs}
            diff = next((k for k in want if got.get(k) != want[k]), name)
            raise UserError(f"{directory / MANIFEST}: its model_config gives {name} tensor {diff!r} the shape "
                            f"{want.get(diff)}, but the engine was built for {got.get(diff)}: the manifest was edited "
                            f"or damaged; {fix}")
        for rel, size in manifest["networks"][name].get("files", {}).items():
            path = directory / rel
            if not path.is_file():
                raise UserError(f"engine file missing: {path}; {fix}")
            if path.stat().st_size != size:
                raise UserError(f"{path} has {path.stat().st_size} bytes but was built with {size}: it changed "
                                f"after the build; {fix}")
    return stored


def load_engines(directory: str | Path, device: str | None = None, torch_mode: str = "aoti",
                 cuda_graphs: bool = True, manifest: dict | None = None) -> EngineNetworks:
    """Open every engine of a directory on `device` (default: the one it was built for). On a GPU each network
    runs as CUDA graphs, one per batch shape (`engine.graphs`), where its backend can be captured. `manifest`:
    the directory's engines.json when the caller has read it already."""
    from nuwaxl.engine.torch_backend import resolve_device
    from nuwaxl.weights import WeightsSource

    d = Path(directory)
    m = manifest or read_manifest(d)
    card = card_from_manifest(d, m)
    config = card.config
    backend, precision = m["backend"], m["precision"]
    dev = resolve_device(device or m["device"])
    dtype = torch_dtype(precision)
    if torch_mode not in ENGINE_TORCH_MODES:
        raise UserError(f"unknown torch mode {torch_mode!r}; use one of {', '.join(ENGINE_TORCH_MODES)}")
    if backend == "torch" and torch_mode != "aoti":  # live modules from the weights the engines were built from
        from nuwaxl.engine.torch_backend import torch_networks

        return torch_networks(WeightsSource.from_record(m["weights"], d).load(), device=str(dev), precision=precision,
                              resolution=config.resolution, torch_mode=torch_mode)
    specs = check_files(d, m)
    module = backend_module(backend)
    if backend == "torch" and dev.type != m["device_type"]:
        raise UserError(f"the AOTInductor packages in {d} were compiled for {m['device_type']}, not "
                        f"{dev.type}; rebuild on this device or use {option('device', m['device_type'])}")
    engines = {n: module.load(d, n, specs[n], dev) for n in NETWORKS}
    graphs = "off: CPU device" if dev.type != "cuda" else "off: not asked for" if not cuda_graphs else "on"
    if graphs == "on":
        # ONNX Runtime says per session whether it can capture (`cuda_graphs`); the others are captured by torch.
        why = next((e.cuda_graphs for e in engines.values() if getattr(e, "cuda_graphs", "on") != "on"), None)
        graphs = why or "on"
        if why is None:
            engines = {n: GraphedEngine(e, specs[n]) for n, e in engines.items()}
    tokenizer = PromptTokenizer(card.tokenizer_json, config.text.max_length)
    return EngineNetworks(engines, tokenizer, NetworkSpec(config, dev, dtype, m["frames_per_call"], backend,
                                                          card.sampling, card.trained_on, graphs))
