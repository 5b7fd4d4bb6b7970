"""A fake student for tests of the serving machinery (not a model).

It answers instantly with a label derived from the input, and can be told to
fail on inputs containing a marker, so the loop's failure handling can be
exercised on a real broker without a model's cost. It never serves real
traffic: ``distilld run`` only builds real backends.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from distilld.errors import BackendError, BackendUnavailable
from distilld.serving.base import Prediction


class FakeStudent:
    def __init__(
        self, labels: Sequence[str], *, fail_on: str | None = None, version: str = "fake-1"
    ) -> None:
        self.labels = list(labels)
        self.fail_on = fail_on
        self.version = version
        self.batches: list[int] = []  # the size of every batch it was given
        self.available = True  # False: every call raises BackendUnavailable (an outage)

    @property
    def model_version(self) -> str:
        return self.version

    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        if not self.available:
            raise BackendUnavailable("fake outage: the student is switched off")
        self.batches.append(len(inputs))
        if self.fail_on is not None and any(self.fail_on in text for text in inputs):
            raise BackendError(f"fake failure: an input contains {self.fail_on!r}")
        return [self._answer(text) for text in inputs]

    def _answer(self, text: str) -> Prediction:
        label = self.labels[zlib.crc32(text.encode("utf-8")) % len(self.labels)]
        return Prediction(output=label, confidence=1.0, probabilities={label: 1.0})

    def close(self) -> None:
        pass
