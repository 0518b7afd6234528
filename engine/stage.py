"""What every backend's build stage shares: the job it is given, stage cache keys, and the parity gate's verdict.

`trt-nuwaxl build` (nuwaxl.build) resolves the weights and the I/O specs, then hands each network to its backend
module's `build_network(job, name, module, reference, spec)` (the registry protocol, `engine.registry`); the
backend writes its files under `job.out` and returns the network's manifest record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nuwaxl.config import ModelConfig
from nuwaxl.errors import option
from nuwaxl.iospec import IOSpec


class ParityError(RuntimeError):
    pass


@dataclass(frozen=True)
class BuildJob:
    out: Path                      # the engine directory
    precision: str                 # fp16 or fp32
    device: torch.device           # where exports, compiles and parity run
    weights_id: str                # identifies the weights in every stage's cache key
    config: ModelConfig
    frames_per_call: int           # L, fixed per build
    parity: dict[str, list[int]]   # batch sizes the parity gate measures, per network (none: not measured)
    force: bool                    # redo every stage even when its cache key matches
    log: Callable[[str], None]
    opt_level: int = 3             # TensorRT builder optimization level
    targets: tuple[str, ...] | None = None  # TensorRT-RTX compute capabilities

    def sample(self, spec: IOSpec, batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Example inputs for export (seed 1; the parity gate draws its own)."""
        from nuwaxl.export.onnx_export import sample_inputs

        return sample_inputs(spec, batch, self.device, dtype, self.config.text.vocab_size,
                             torch.Generator().manual_seed(1))

    def measure_parity(self, name: str, engine_run: Callable[[dict], dict], reference: nn.Module, spec: IOSpec,
                       device: torch.device, engine_name: str, batches: list[int] | None = None) -> dict:
        """The engine against the fp32 reference on fresh inputs at the job's parity batch sizes (or `batches`,
        for a backend that must reach more of its files)."""
        from nuwaxl.dtypes import torch_dtype
        from nuwaxl.export.onnx_export import sample_inputs
        from nuwaxl.export.parity import measure_parity

        g = torch.Generator().manual_seed(0)
        dtype = torch_dtype(self.precision)
        return measure_parity(engine_run, reference, spec, self.precision,
                              self.parity[name] if batches is None else batches, device,
                              lambda b: sample_inputs(spec, b, device, dtype, self.config.text.vocab_size, g),
                              engine_name)


def stage_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached(manifest_path: Path, key: str, force: bool) -> dict | None:
    """The stage's previous manifest if its key matches (the stage's output is then reused)."""
    if force or not manifest_path.is_file():
        return None
    old = json.loads(manifest_path.read_text())
    return old if old.get("stage_key") == key else None


def check_parity(name: str, parity: dict, where: Path) -> None:
    if parity.get("measured") and not parity["passed"]:
        raise ParityError(f"{name}: parity failed (worst relative error {parity['worst_rel_err']:.2e} > "
                          f"{parity['tolerance']:.0e}); details in {where}")


def parity_text(result: dict) -> str:
    if not result["measured"]:
        return f"parity not measured ({option('parity', 'none')})"
    return f"parity {result['worst_rel_err']:.1e} (tolerance {result['tolerance']:.0e})"
