"""Per-input features that drift monitoring compares: what the inputs look like.

Each input becomes one row of plain numbers (and the student's predicted
label): text descriptors (length, word count, out-of-vocabulary share, shares
of digits, uppercase letters, punctuation and non-ASCII characters), a few
components of an embedding projection, and the student's label and
confidence. Evidently then tests each column of recent traffic against the
same columns of the reference (the inputs the live student was trained on).

The reference side is fitted once, when a student is trained, and saved as
one JSON file next to the model: the vocabulary and the projection belong to
that student, and the current traffic must be described with them, not with
a vocabulary rebuilt from itself.

Everything here is pure and deterministic: no model hub, no randomness. The
embedding projection is a PCA fitted on the reference, either of hashed
bag-of-words vectors (stable CRC32 hashing, never Python's salted ``hash``)
or of embedding vectors the caller provides.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

# MonitoringError is defined in distilld.errors and re-exported here.
from distilld.errors import MonitoringError as MonitoringError
from distilld.monitoring.config import DESCRIPTOR_FEATURES

FloatArray = npt.NDArray[np.float64]

REFERENCE_FORMAT = "distilld-drift-reference"
REFERENCE_VERSION = 1

# Column names, in the order of the frame: the descriptor names a policy may list.
DESCRIPTOR_COLUMNS = DESCRIPTOR_FEATURES
EMBEDDING_PREFIX = "embedding_"
LABEL_COLUMN = "predicted_label"
CONFIDENCE_COLUMN = "confidence"

#: The drift reference's file name inside a student's model directory: the
#: inputs the student was trained on, described by :func:`fit_reference`.
REFERENCE_FILE = "drift-reference.json"

# Word tokens for the vocabulary and the bag of words: runs of letters (with
# inner apostrophes), lowercased. Numbers are left out on purpose: every new
# year or price would otherwise count as an unknown word.
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_PUNCTUATION = re.compile(r"[^\w\s]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# Rows per block when accumulating the covariance: bounds memory to
# block x dims floats whatever the reference size.
_BLOCK_ROWS = 2048


@dataclass(frozen=True, eq=False)
class TextProfile:
    """What the featurizer learned from the reference: vocabulary and projection.

    ``source`` says what the projection was fitted on: "hashed-words" (a
    bag-of-words hashed into ``hash_dims`` buckets) or "embeddings" (vectors
    given by the caller, which must then give them for current traffic too).
    """

    vocabulary: frozenset[str]
    source: Literal["hashed-words", "embeddings"]
    hash_dims: int
    mean: FloatArray  # (d,)
    components: FloatArray  # (k, d), one unit-length row per component

    @property
    def embedding_dims(self) -> int:
        return int(self.components.shape[0])


#: Where a reference comes from: "model", the inputs a student was trained on
#: (saved when it is trained); "pinned", the first requests a version answered
#: (for a version that came without one, e.g. a student trained elsewhere).
ReferenceOrigin = Literal["model", "pinned"]


@dataclass(frozen=True, eq=False)
class Reference:
    """The reference inputs' features and the profile that describes new inputs alike."""

    profile: TextProfile
    frame: pd.DataFrame
    origin: ReferenceOrigin = "model"


# --------------------------------------------------------------------------- descriptors


def words(text: str) -> list[str]:
    """The lowercased word tokens of ``text`` used for the vocabulary and bag of words."""
    return _WORD.findall(text.lower())


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _descriptor_row(text: str, tokens: list[str], known: list[bool]) -> list[float]:
    chars = len(text)
    split = text.split()
    letters = sum(map(str.isalpha, text))
    return [
        float(chars),
        float(len(split)),
        _share(sum(map(len, split)), len(split)),
        _share(known.count(False), len(known)),
        _share(sum(map(str.isdigit, text)), chars),
        _share(sum(map(str.isupper, text)), letters),
        _share(len(_PUNCTUATION.findall(text)), chars),
        _share(len(_NON_ASCII.findall(text)), chars),
    ]


# --------------------------------------------------------------------------- projection


def _hashed_words(token_lists: Sequence[list[str]], dims: int) -> FloatArray:
    """Signed, log-scaled, L2-normalised hashed bag of words, one row per input.

    The sign (from a CRC bit not used for the bucket) makes colliding words
    cancel out on average instead of adding up.
    """
    matrix = np.zeros((len(token_lists), dims), dtype=np.float64)
    cache: dict[str, tuple[int, float]] = {}
    for row, tokens in enumerate(token_lists):
        for token, count in Counter(tokens).items():
            slot = cache.get(token)
            if slot is None:
                h = zlib.crc32(token.encode("utf-8"))
                slot = (h % dims, 1.0 if (h >> 31) & 1 else -1.0)
                cache[token] = slot
            matrix[row, slot[0]] += slot[1] * math.log1p(count)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    np.divide(matrix, norms, out=matrix, where=norms > 0)
    return matrix


def _fit_pca(vectors: FloatArray, k: int) -> tuple[FloatArray, FloatArray]:
    """Mean and the top-``k`` principal directions of ``vectors`` (n x d).

    The covariance is accumulated block by block so memory stays d x d plus
    one block. Each direction's sign is fixed (largest loading positive) so a
    refit on the same data gives the same columns.
    """
    n, d = vectors.shape
    if n < 2:
        raise MonitoringError(
            f"the embedding projection needs at least 2 reference inputs (received {n})"
        )
    if k > d:
        raise MonitoringError(
            f"cannot keep {k} embedding components from {d}-dimensional vectors; "
            f"lower embedding_dims to at most {d}"
        )
    total = np.zeros(d)
    gram = np.zeros((d, d))
    for start in range(0, n, _BLOCK_ROWS):
        block = vectors[start : start + _BLOCK_ROWS]
        total += block.sum(axis=0)
        gram += block.T @ block
    mean = total / n
    covariance = (gram - n * np.outer(mean, mean)) / (n - 1)
    _, eigenvectors = np.linalg.eigh(covariance)  # ascending eigenvalues
    components = eigenvectors[:, ::-1][:, :k].T.copy()
    for row in components:
        if row[np.argmax(np.abs(row))] < 0:
            row *= -1.0
    return mean, components


def _project(vectors: FloatArray, profile: TextProfile) -> FloatArray:
    return np.asarray((vectors - profile.mean) @ profile.components.T, dtype=np.float64)


def _embedding_vectors(
    texts: Sequence[str],
    token_lists: Sequence[list[str]],
    source: str,
    hash_dims: int,
    embeddings: npt.ArrayLike | None,
) -> FloatArray:
    if source == "hashed-words":
        if embeddings is not None:
            raise MonitoringError(
                "embeddings were given, but this reference's projection was fitted on hashed "
                "words; describe current traffic the way the reference was described"
            )
        return _hashed_words(token_lists, hash_dims)
    if embeddings is None:
        raise MonitoringError(
            "this reference's projection was fitted on embedding vectors; pass the current "
            "inputs' embeddings (same model) as `embeddings`"
        )
    vectors = np.asarray(embeddings, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise MonitoringError(
            f"embeddings must be a 2-D array with one row per input ({len(texts)} rows); "
            f"received shape {vectors.shape}"
        )
    if not np.all(np.isfinite(vectors)):
        raise MonitoringError("embeddings contain NaN or infinite values")
    return vectors


# --------------------------------------------------------------------------- frames


def _check_lengths(
    texts: Sequence[str],
    predicted_labels: Sequence[str] | None,
    confidences: Sequence[float] | None,
) -> None:
    if isinstance(texts, str):
        raise MonitoringError("texts must be a sequence of strings, received one string")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise MonitoringError(
            f"texts must all be strings; item {bad} is {type(texts[bad]).__name__}"
        )
    for name, values in (("predicted_labels", predicted_labels), ("confidences", confidences)):
        if values is not None and len(values) != len(texts):
            raise MonitoringError(
                f"{name} must have one value per input: received {len(values)} for "
                f"{len(texts)} inputs"
            )
    if confidences is not None:
        bad_values = [c for c in confidences if not (0.0 <= float(c) <= 1.0)]
        if bad_values:
            raise MonitoringError(
                f"confidences must lie in [0, 1]; received {bad_values[:5]} "
                f"({len(bad_values)} out of range)"
            )


def _frame(
    descriptors: list[list[float]],
    projected: FloatArray,
    predicted_labels: Sequence[str] | None,
    confidences: Sequence[float] | None,
) -> pd.DataFrame:
    columns: dict[str, Any] = {}
    table = np.asarray(descriptors, dtype=np.float64).reshape(
        len(descriptors), len(DESCRIPTOR_COLUMNS)
    )
    for i, name in enumerate(DESCRIPTOR_COLUMNS):
        columns[name] = table[:, i]
    for i in range(projected.shape[1]):
        columns[f"{EMBEDDING_PREFIX}{i}"] = projected[:, i]
    if predicted_labels is not None:
        columns[LABEL_COLUMN] = pd.Series([str(v) for v in predicted_labels], dtype=object)
    if confidences is not None:
        columns[CONFIDENCE_COLUMN] = np.asarray(confidences, dtype=np.float64)
    return pd.DataFrame(columns)


def fit_reference(
    texts: Sequence[str],
    *,
    predicted_labels: Sequence[str] | None = None,
    confidences: Sequence[float] | None = None,
    embeddings: npt.ArrayLike | None = None,
    embedding_dims: int = 4,
    hash_dims: int = 512,
    min_df: int = 2,
) -> Reference:
    """Fit the vocabulary and projection on reference inputs and describe them.

    The vocabulary holds the words found in at least ``min_df`` reference
    inputs. A reference input's own out-of-vocabulary share is counted
    leave-one-out (a word is known only if ``min_df`` *other* inputs have it):
    counted against a vocabulary that includes the input itself, it would
    always be 0 and fresh traffic would look drifted on that feature alone.

    ``predicted_labels`` and ``confidences`` are the student's answers on these
    inputs (leave them out for tasks without a label); ``embeddings`` replaces
    the hashed words as what the projection is fitted on.
    """
    _check_lengths(texts, predicted_labels, confidences)
    if min_df < 1:
        raise MonitoringError(f"min_df must be at least 1 (received {min_df})")
    if hash_dims < embedding_dims:
        raise MonitoringError(
            f"hash_dims ({hash_dims}) must be at least embedding_dims ({embedding_dims})"
        )
    token_lists = [words(t) for t in texts]
    document_frequency: Counter[str] = Counter()
    for tokens in token_lists:
        document_frequency.update(set(tokens))
    vocabulary = frozenset(w for w, df in document_frequency.items() if df >= min_df)
    descriptors = [
        _descriptor_row(text, tokens, [document_frequency[w] - 1 >= min_df for w in tokens])
        for text, tokens in zip(texts, token_lists, strict=True)
    ]
    source: Literal["hashed-words", "embeddings"] = (
        "hashed-words" if embeddings is None else "embeddings"
    )
    vectors = _embedding_vectors(texts, token_lists, source, hash_dims, embeddings)
    mean, components = _fit_pca(vectors, embedding_dims)
    profile = TextProfile(
        vocabulary=vocabulary,
        source=source,
        hash_dims=hash_dims if source == "hashed-words" else int(vectors.shape[1]),
        mean=mean,
        components=components,
    )
    frame = _frame(descriptors, _project(vectors, profile), predicted_labels, confidences)
    return Reference(profile=profile, frame=frame)


def describe(
    texts: Sequence[str],
    profile: TextProfile,
    *,
    predicted_labels: Sequence[str] | None = None,
    confidences: Sequence[float] | None = None,
    embeddings: npt.ArrayLike | None = None,
) -> pd.DataFrame:
    """Features of current inputs, with the reference's vocabulary and projection."""
    _check_lengths(texts, predicted_labels, confidences)
    token_lists = [words(t) for t in texts]
    vocabulary = profile.vocabulary
    descriptors = [
        _descriptor_row(text, tokens, [w in vocabulary for w in tokens])
        for text, tokens in zip(texts, token_lists, strict=True)
    ]
    vectors = _embedding_vectors(texts, token_lists, profile.source, profile.hash_dims, embeddings)
    if vectors.shape[1] != profile.mean.shape[0]:
        raise MonitoringError(
            f"embeddings have {vectors.shape[1]} dimensions but the reference's have "
            f"{profile.mean.shape[0]}; use the same embedding model as the reference"
        )
    return _frame(descriptors, _project(vectors, profile), predicted_labels, confidences)


# --------------------------------------------------------------------------- files


def save_reference(reference: Reference, path: Path) -> None:
    """Write the reference (profile and features) as one JSON file, atomically.

    JSON rather than parquet: nothing beyond the standard library is needed to
    read it back, and floats round-trip exactly.
    """
    profile = reference.profile
    frame = reference.frame
    columns: dict[str, list[Any]] = {}
    for name in frame.columns:
        series = frame[name]
        if name == LABEL_COLUMN:
            columns[name] = [str(v) for v in series]
        else:
            columns[name] = [float(v) for v in series]
    doc = {
        "format": REFERENCE_FORMAT,
        "version": REFERENCE_VERSION,
        "profile": {
            "vocabulary": sorted(profile.vocabulary),
            "source": profile.source,
            "hash_dims": profile.hash_dims,
            "mean": profile.mean.tolist(),
            "components": profile.components.tolist(),
        },
        "rows": len(frame),
        "columns": columns,
        # Optional: readers that predate it ignore it, and its absence means "model".
        "origin": reference.origin,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a reader never sees a half-written reference.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(doc, handle, allow_nan=False)
            handle.flush()
            os.fsync(handle.fileno())  # what the rename publishes survives a power loss
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_reference(path: Path) -> Reference:
    """Read a file written by :func:`save_reference`; any problem is a MonitoringError."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MonitoringError(
            f"drift reference {path} not found; it is written when a student is trained "
            "(fit_reference + save_reference)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MonitoringError(f"drift reference {path} cannot be read: {exc}") from None
    try:
        if doc.get("format") != REFERENCE_FORMAT or doc.get("version") != REFERENCE_VERSION:
            raise ValueError(
                f"expected format {REFERENCE_FORMAT!r} version {REFERENCE_VERSION}, received "
                f"format {doc.get('format')!r} version {doc.get('version')!r}"
            )
        raw = doc["profile"]
        source = raw["source"]
        if source not in ("hashed-words", "embeddings"):
            raise ValueError(f"unknown projection source {source!r}")
        mean = np.asarray(raw["mean"], dtype=np.float64)
        components = np.asarray(raw["components"], dtype=np.float64)
        if mean.ndim != 1 or components.ndim != 2 or components.shape[1] != mean.shape[0]:
            raise ValueError(
                f"projection shapes do not match: mean {mean.shape}, components {components.shape}"
            )
        profile = TextProfile(
            vocabulary=frozenset(str(w) for w in raw["vocabulary"]),
            source=source,
            hash_dims=int(raw["hash_dims"]),
            mean=mean,
            components=components,
        )
        origin = doc.get("origin", "model")
        if origin not in ("model", "pinned"):
            raise ValueError(f"unknown origin {origin!r}")
        rows = int(doc["rows"])
        columns: dict[str, Any] = {}
        for name, values in doc["columns"].items():
            if len(values) != rows:
                raise ValueError(f"column {name!r} has {len(values)} values, expected {rows}")
            if name == LABEL_COLUMN:
                columns[name] = pd.Series([str(v) for v in values], dtype=object)
            else:
                columns[name] = np.asarray(values, dtype=np.float64)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise MonitoringError(
            f"drift reference {path} is not a valid reference file ({detail}); "
            "write it again with save_reference"
        ) from None
    return Reference(profile=profile, frame=pd.DataFrame(columns), origin=origin)
