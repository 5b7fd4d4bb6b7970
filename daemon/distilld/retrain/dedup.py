"""Finding duplicate inputs: text normalisation, word shingles, and near duplicates
by MinHash with banded locality-sensitive hashing. Pure functions.

:func:`near_duplicates` finds, among texts (normalised with
:func:`normalize_text`), each one whose word shingles (``words`` consecutive
words) have a Jaccard similarity of at least ``threshold`` with an earlier
one. Candidate pairs come from MinHash signatures (64 hash functions, 16
bands of 4; a pair at Jaccard 0.8 is found with probability 0.9998, at 0.6
with 0.89), and every pair is confirmed on the exact Jaccard, so nothing
below the threshold is ever reported. Hashes are CRC32 and fixed
coefficients: the result does not depend on the process (Python's ``hash``
is salted per process). Used by the input selection
(:mod:`distilld.retrain.select`) and the split (:mod:`distilld.retrain.split`).
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections import defaultdict
from collections.abc import Collection, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["jaccard", "near_duplicates", "normalize_text", "shingles"]

# MinHash: NUM_PERM hash functions, LSH with BANDS bands of ROWS rows.
NUM_PERM = 64
BANDS = 16
ROWS = NUM_PERM // BANDS
# Fixed odd 64-bit multipliers and offsets: multiply-shift hashing, wrapping
# uint64 arithmetic, the high 32 bits kept. Fixed so results never depend on
# the process or the selection seed.
_COEFFICIENTS = np.random.default_rng(20240917).integers(
    0, np.iinfo(np.uint64).max, size=(2, NUM_PERM), dtype=np.uint64, endpoint=True
) | np.uint64(1)
_MIX = np.uint64(0x9E3779B97F4A7C15)  # combines token hashes into a shingle hash
_CHUNK_SHINGLES = 32_768  # shingles hashed at once (32k x 64 uint64 = 16 MiB)
_WORD = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    """The text duplicates are found on: case-folded, whitespace collapsed, stripped."""
    return " ".join(text.split()).casefold()


def shingles(text: str, words: int = 3) -> frozenset[str]:
    """The ``words``-word shingles of a text (normalise it first).

    Words are runs of letters and digits (punctuation is ignored). A text
    shorter than ``words`` words is one shingle of all its words.
    """
    tokens = _WORD.findall(text)
    if len(tokens) <= words:
        return frozenset({" ".join(tokens)}) if tokens else frozenset()
    return frozenset(" ".join(tokens[i : i + words]) for i in range(len(tokens) - words + 1))


def jaccard(a: Collection[object], b: Collection[object]) -> float:
    """|a & b| / |a | b| of two sets; 1.0 for two empty sets."""
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


class _Shingled:
    """The hashed shingles of many texts, built with numpy in one pass.

    ``hashes[offsets[i]:offsets[i + 1]]`` are text i's shingle hashes (64-bit,
    repeats possible); :meth:`set_of` gives the set the exact Jaccard reads.
    """

    def __init__(self, texts: Sequence[str], words: int) -> None:
        # Each new word gets the next id, in C (defaultdict + map).
        vocab: defaultdict[str, int] = defaultdict(itertools.count().__next__)
        ids: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            tokens = _WORD.findall(text)
            lengths[i] = len(tokens)
            ids.extend(map(vocab.__getitem__, tokens))
        token_hash = np.fromiter(
            (zlib.crc32(t.encode()) for t in vocab), dtype=np.uint64, count=len(vocab)
        )
        token = token_hash[np.asarray(ids, dtype=np.int64)]
        token_start = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        # One shingle per window of `words` tokens; a shorter text has one.
        counts = np.where(lengths >= words, lengths - words + 1, np.minimum(lengths, 1))
        self.offsets = np.concatenate(([0], np.cumsum(counts)))
        owner = np.repeat(np.arange(len(texts)), counts)
        within = np.arange(int(self.offsets[-1])) - self.offsets[:-1][owner]
        position = token_start[owner] + within
        size = np.minimum(words, lengths[owner])
        hashes = np.zeros(len(position), dtype=np.uint64)
        for k in range(words):
            valid = k < size
            index = np.where(valid, position + k, 0)
            step = hashes * _MIX + token[index] + np.uint64(1) if len(token) else hashes
            hashes = np.where(valid, step, hashes)
        self.hashes = hashes
        self.owner = owner
        self._sets: dict[int, frozenset[int]] = {}

    def set_of(self, i: int) -> frozenset[int]:
        found = self._sets.get(i)
        if found is None:
            found = frozenset(self.hashes[self.offsets[i] : self.offsets[i + 1]].tolist())
            self._sets[i] = found
        return found

    def minhash(self) -> npt.NDArray[np.uint64]:
        """MinHash signatures (texts x NUM_PERM); a text without shingles gets 2**32."""
        n = len(self.offsets) - 1
        signatures = np.full((n, NUM_PERM), 1 << 32, dtype=np.uint64)
        a, b = _COEFFICIENTS
        shift = np.uint64(32)
        for start in range(0, len(self.hashes), _CHUNK_SHINGLES):
            chunk = self.hashes[start : start + _CHUNK_SHINGLES]
            hashed = (a[:, None] * chunk[None, :] + b[:, None]) >> shift  # perms x shingles
            # Shingles of one text are contiguous: reduce each run to its minimum.
            owners = self.owner[start : start + _CHUNK_SHINGLES]
            starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
            minima = np.minimum.reduceat(hashed, starts, axis=1).T
            rows = owners[starts]
            signatures[rows] = np.minimum(signatures[rows], minima)
        return signatures


def near_duplicates(texts: Sequence[str], threshold: float, words: int) -> dict[int, int]:
    """Index of each near duplicate -> index of the earlier text it duplicates."""
    if not texts:
        return {}
    shingled = _Shingled(texts, words)
    signatures = shingled.minhash()
    # One 64-bit key per band (a collision only costs one exact comparison).
    band_keys = np.zeros((len(texts), BANDS), dtype=np.uint64)
    for r in range(ROWS):
        band_keys = band_keys * _MIX + signatures[:, r::ROWS] + np.uint64(1)
    # Only texts sharing a band key with another text can be near duplicates.
    shared = np.zeros(band_keys.shape, dtype=bool)
    for band in range(BANDS):
        _, inverse, counts = np.unique(band_keys[:, band], return_inverse=True, return_counts=True)
        shared[:, band] = counts[inverse] > 1
    active = np.flatnonzero(shared.any(axis=1))
    buckets: list[dict[int, list[int]]] = [{} for _ in range(BANDS)]
    duplicates: dict[int, int] = {}
    for i, keys, mask in zip(
        active.tolist(), band_keys[active].tolist(), shared[active].tolist(), strict=True
    ):
        mine = [(band, key) for band, key in enumerate(keys) if mask[band]]
        match = None
        seen: set[int] = set()
        for band, key in mine:
            for j in buckets[band].get(key, ()):
                if j not in seen:
                    seen.add(j)
                    if _jaccard(shingled.set_of(i), shingled.set_of(j)) >= threshold:
                        match = j
                        break
            if match is not None:
                break
        if match is not None:
            duplicates[i] = match
            continue
        for band, key in mine:
            buckets[band].setdefault(key, []).append(i)
    return duplicates


def _jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
