"""The on-disk model registry of one task (see :mod:`distilld.registry.model_registry`).

``metadata``: manifests, the live pointer and the state rules; ``files``: the
model files (staging, fsync, atomic rename, deletion); ``lock``: one process
changes a registry at a time; ``steps``: the named steps the crash tests stop at.
"""

from __future__ import annotations

from distilld.errors import RegistryError as RegistryError
from distilld.registry.files import fsync_tree as fsync_tree
from distilld.registry.metadata import STATES, VERSION_PATTERN, LivePointer, Manifest, State
from distilld.registry.model_registry import ModelRegistry as ModelRegistry

__all__ = [
    "STATES",
    "VERSION_PATTERN",
    "LivePointer",
    "Manifest",
    "ModelRegistry",
    "RegistryError",
    "State",
]
