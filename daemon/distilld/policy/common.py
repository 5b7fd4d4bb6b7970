"""Building blocks shared by every policy section.

``policy/model.py`` assembles the policy from its sections, and some sections
live beside the code that reads them (``teacher/config.py``,
``monitoring/config.py``). What more than one of them needs is here, in a
module that imports none of them, so that ``model.py`` can import the
sections and the sections can import these names without an import cycle.
``model.py`` re-exports every name, which stays the place to import them from
outside the policy sections.
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

INPUT_PLACEHOLDER = "{input}"


class PolicyFieldError(ValueError):
    """A cross-field check failed, and ``field`` (a dotted path) is the field at fault.

    pydantic reports a model validator's error at the model's own location; the
    loader reads ``field`` back from the error so the operator sees which field
    to change. It is a ValueError because pydantic only turns ValueErrors raised
    in validators into validation errors; it never leaves the policy loader.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Architecture(StrEnum):
    """How a model directory is loaded and driven (the student's or the teacher's)."""

    sequence_classification = "sequence-classification"
    causal_lm = "causal-lm"


class StrictModel(BaseModel):
    """Base of every policy section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_segment_keys(value: list[str] | None) -> list[str] | None:
    """Validate a list of segment keys (None: every key); pydantic field validator."""
    if value is None:
        return None
    if not value:
        raise ValueError("must name at least one key, or be left out to use every key")
    bad = [key for key in value if not key or "=" in key or key != key.strip()]
    if bad:
        raise ValueError(
            f"segment keys must be non-empty, without '=' or surrounding spaces (received {bad})"
        )
    repeated = sorted({key for key in value if value.count(key) > 1})
    if repeated:
        raise ValueError(f"segment keys must be distinct (repeated: {repeated})")
    return value


def check_no_parent_parts(value: str | None) -> str | None:
    """Refuse a model path with ``..`` parts (either slash); pydantic field validator.

    ``modelpaths.resolve_model_dir`` also refuses any path that resolves outside
    the models directory; this check says so when the policy is loaded."""
    if value is not None and ".." in re.split(r"[\\/]", value):
        raise ValueError(f"must not contain '..' path parts (received {value!r})")
    return value
