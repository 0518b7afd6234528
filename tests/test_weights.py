"""Where the weights come from, decided in one place (nuwaxl.weights)."""

import pytest

from nuwaxl.errors import UserError
from nuwaxl.models.checkpoint import bundled_checkpoint
from nuwaxl.weights import WeightsSource


def test_nothing_named_means_the_bundled_trained_weights():
    source = WeightsSource.resolve()
    assert (source.kind, source.name) == ("checkpoint", str(bundled_checkpoint()))
    assert source.card().trained_on.trained


def test_two_sources_named_at_once_is_an_error_naming_both():
    with pytest.raises(UserError, match="give one of checkpoint='x.safetensors', preset='tiny': they name different"):
        WeightsSource.resolve(checkpoint="x.safetensors", preset="tiny")
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        WeightsSource.resolve(preset="huge")


def test_records_round_trip_and_a_changed_checkpoint_is_caught(tmp_path):
    preset = WeightsSource.resolve(preset="tiny", seed=3)
    assert preset.record() == {"source": "preset:tiny", "seed": 3, "sha256": None}
    assert WeightsSource.from_record(preset.record(), tmp_path) == preset
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(bundled_checkpoint().read_bytes())
    record = WeightsSource.resolve(checkpoint=str(ckpt)).record()
    assert record["bytes"] == ckpt.stat().st_size and len(record["sha256"]) == 64
    assert WeightsSource.from_record(record, tmp_path).name == str(ckpt.resolve())
    with ckpt.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="were built from .*w.safetensors, which is missing or changed"):
        WeightsSource.from_record(record, tmp_path)


def test_bundled_weights_stay_under_20_mib():
    """Everything under nuwaxl/assets/weights (generator and probes) is checked in: at most 20 MiB together."""
    from pathlib import Path

    import nuwaxl

    folder = Path(nuwaxl.__file__).parent / "assets" / "weights"
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 20 * 2**20
