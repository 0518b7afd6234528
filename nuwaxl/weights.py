"""Where the weights come from, decided in one place.

A `WeightsSource` is one of: a checkpoint file, a preset's random weights (regenerated from a seed), or an engine
directory (whose manifest, read once here, records which of the other two it was built from). Nothing named:
the bundled trained checkpoint. The CLI, `build`, the pipeline and the engine directory all ask it for the card
(what the weights are, read without loading them), the models, or the record a manifest keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nuwaxl.config import WeightsCard
from nuwaxl.errors import UserError, option

Kind = Literal["checkpoint", "preset", "engines"]


@dataclass(frozen=True)
class WeightsSource:
    kind: Kind
    name: str               # the checkpoint's path, the preset's name or the engine directory
    seed: int = 0           # a preset's random weights
    manifest: dict | None = None  # an engine directory's engines.json, read once

    @classmethod
    def resolve(cls, checkpoint: str | None = None, preset: str | None = None, engines: str | None = None,
                seed: int = 0) -> WeightsSource:
        """At most one of checkpoint, preset and engines; none: the bundled trained weights."""
        named = [(k, v) for k, v in (("checkpoint", checkpoint), ("preset", preset), ("engines", engines)) if v]
        if len(named) > 1:
            raise UserError(f"give one of {', '.join(option(k, v) for k, v in named)}: they name different "
                            "weights")
        if not named:
            from nuwaxl.models.checkpoint import bundled_checkpoint

            return cls("checkpoint", str(bundled_checkpoint()))
        kind, value = named[0]
        if kind == "engines":
            from nuwaxl.engine.directory import read_manifest

            return cls("engines", str(value), manifest=read_manifest(value))
        if kind == "preset":
            from nuwaxl.config import preset as preset_config

            preset_config(value)  # an unknown name fails here, with the known ones
        return cls(kind, str(value), seed=seed)

    @classmethod
    def from_record(cls, record: dict, directory: str | Path) -> WeightsSource:
        """The weights an engine directory was built from (it records them, it does not copy them): the
        checkpoint file, checked by size, or the preset's random weights and their seed."""
        if record["source"].startswith("preset:"):
            return cls("preset", record["source"].removeprefix("preset:"), seed=record["seed"])
        path = Path(record["source"])
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            raise UserError(f"the engines in {directory} were built from {path}, which is missing or changed; the "
                            f"live torch modes need it (the AOTInductor packages do not: "
                            f"{option('torch_mode', 'aoti')})")
        return cls("checkpoint", str(path))

    def card(self) -> WeightsCard:
        """What the weights are, from a header, a manifest or a preset: no weights are loaded."""
        if self.kind == "engines":
            from nuwaxl.engine.directory import card_from_manifest

            return card_from_manifest(self.name, self.manifest)
        if self.kind == "preset":
            from nuwaxl.models.checkpoint import preset_card

            return preset_card(self.name)
        from nuwaxl.models.checkpoint import read_card

        return read_card(self.name)

    def built_from(self) -> WeightsSource:
        """The checkpoint or preset behind an engine directory (itself for the others)."""
        return WeightsSource.from_record(self.manifest["weights"], self.name) if self.kind == "engines" else self

    def load(self, init_device: str = "cpu"):
        """The models (NuwaModels): an engine directory gives the weights it was built from."""
        from nuwaxl.models.checkpoint import NuwaModels, load_checkpoint

        src = self.built_from()
        if src.kind == "preset":
            from nuwaxl.config import preset

            return NuwaModels.random(preset(src.name), seed=src.seed, device=init_device)
        return load_checkpoint(src.name)

    def record(self) -> dict:
        """What an engine directory's manifest keeps of its weights (`from_record` reads it back)."""
        src = self.built_from()
        if src.kind == "preset":
            return {"source": f"preset:{src.name}", "seed": src.seed, "sha256": None}
        from nuwaxl.export.onnx_export import sha256_file

        path = Path(src.name).resolve()
        return {"source": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
