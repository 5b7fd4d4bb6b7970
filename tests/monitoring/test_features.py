"""Per-input features: descriptors on hand examples, the leave-one-out vocabulary,
the deterministic projection, and the reference file round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distilld.monitoring.features import (
    CONFIDENCE_COLUMN,
    DESCRIPTOR_COLUMNS,
    LABEL_COLUMN,
    MonitoringError,
    describe,
    fit_reference,
    load_reference,
    save_reference,
    words,
)

REFERENCE_TEXTS = [
    "A warm and funny film.",
    "The plot is thin but the cast is warm.",
    "Funny, sharp and far too short.",
    "A thin, tired sequel.",
    "The cast saves a thin script.",
    "Sharp writing, a funny cast.",
    "Too long and too tired.",
    "A film with a warm heart.",
]


def test_descriptors_of_a_hand_example() -> None:
    reference = fit_reference(REFERENCE_TEXTS, embedding_dims=2)
    row = describe(["Hello, World 42!"], reference.profile).iloc[0]
    assert row["char_length"] == 16
    assert row["word_count"] == 3
    assert row["mean_word_length"] == pytest.approx((6 + 5 + 3) / 3)
    assert row["digit_share"] == pytest.approx(2 / 16)
    assert row["uppercase_share"] == pytest.approx(2 / 10)  # of the 10 letters
    assert row["punctuation_share"] == pytest.approx(2 / 16)  # "," and "!"
    assert row["non_ascii_share"] == 0.0
    assert row["oov_share"] == 1.0  # neither "hello" nor "world" is in the reference


def test_an_empty_input_is_all_zeros_not_an_error() -> None:
    reference = fit_reference(REFERENCE_TEXTS, embedding_dims=2)
    row = describe([""], reference.profile).iloc[0]
    assert all(row[c] == 0.0 for c in DESCRIPTOR_COLUMNS)


def test_words_are_lowercased_letter_runs_without_numbers() -> None:
    assert words("Don't PANIC: 42 Élan") == ["don't", "panic", "élan"]


def test_reference_oov_is_counted_leave_one_out() -> None:
    # df: a=3, b=2, c=1; with min_df=2 the vocabulary is {a, b}.
    reference = fit_reference(["a b", "a c", "a b"], embedding_dims=1, min_df=2)
    assert reference.profile.vocabulary == {"a", "b"}
    # For a reference row, "b" is known only if 2 *other* rows have it: they do not.
    assert list(reference.frame["oov_share"]) == [0.5, 0.5, 0.5]
    # New traffic is counted against the full vocabulary.
    assert describe(["a b"], reference.profile)["oov_share"].iloc[0] == 0.0
    assert describe(["a zzz"], reference.profile)["oov_share"].iloc[0] == 0.5


def test_columns_and_determinism() -> None:
    labels = ["fresh", "rotten"] * 4
    confidences = [0.9, 0.6, 0.8, 0.7, 0.95, 0.5, 0.99, 0.65]
    first = fit_reference(
        REFERENCE_TEXTS, predicted_labels=labels, confidences=confidences, embedding_dims=3
    )
    again = fit_reference(
        REFERENCE_TEXTS, predicted_labels=labels, confidences=confidences, embedding_dims=3
    )
    assert list(first.frame.columns) == [
        *DESCRIPTOR_COLUMNS,
        "embedding_0",
        "embedding_1",
        "embedding_2",
        LABEL_COLUMN,
        CONFIDENCE_COLUMN,
    ]
    pd.testing.assert_frame_equal(first.frame, again.frame)
    # PCA of the reference: components are unit vectors, projections centred.
    norms = np.linalg.norm(first.profile.components, axis=1)
    assert np.allclose(norms, 1.0)
    assert np.allclose(first.frame[["embedding_0", "embedding_1"]].mean(), 0.0, atol=1e-9)
    assert first.frame["embedding_0"].var() >= first.frame["embedding_1"].var()


def test_without_answers_there_are_no_label_columns() -> None:
    frame = fit_reference(REFERENCE_TEXTS, embedding_dims=2).frame
    assert LABEL_COLUMN not in frame.columns
    assert CONFIDENCE_COLUMN not in frame.columns


def test_provided_embeddings_replace_the_hashed_words() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(len(REFERENCE_TEXTS), 6))
    reference = fit_reference(REFERENCE_TEXTS, embeddings=vectors, embedding_dims=2)
    assert reference.profile.source == "embeddings"
    current = describe(REFERENCE_TEXTS[:2], reference.profile, embeddings=vectors[:2])
    assert np.allclose(current["embedding_0"], reference.frame["embedding_0"][:2])
    with pytest.raises(MonitoringError, match="pass the current inputs' embeddings"):
        describe(["x"], reference.profile)
    with pytest.raises(MonitoringError, match="5 dimensions but the reference's have 6"):
        describe(["x"], reference.profile, embeddings=np.zeros((1, 5)))
    hashed = fit_reference(REFERENCE_TEXTS, embedding_dims=2)
    with pytest.raises(MonitoringError, match="fitted on hashed words"):
        describe(["x"], hashed.profile, embeddings=np.zeros((1, 6)))


def test_bad_inputs_say_what_was_received() -> None:
    with pytest.raises(MonitoringError, match="received 1 for 2 inputs"):
        fit_reference(["a", "b"], predicted_labels=["x"])
    with pytest.raises(MonitoringError, match=r"must lie in \[0, 1\]; received \[1.5\]"):
        fit_reference(["a", "b"], confidences=[0.5, 1.5])
    with pytest.raises(MonitoringError, match="item 1 is int"):
        fit_reference(["a", 3])  # type: ignore[list-item]
    with pytest.raises(MonitoringError, match="received one string"):
        fit_reference("a text")
    with pytest.raises(MonitoringError, match="at least 2 reference inputs"):
        fit_reference(["alone"])
    with pytest.raises(MonitoringError, match="embedding_dims to at most 3"):
        fit_reference(["a", "b"], embeddings=np.zeros((2, 3)), embedding_dims=4)


def test_reference_file_round_trip(tmp_path: Path) -> None:
    reference = fit_reference(
        REFERENCE_TEXTS,
        predicted_labels=["1", "0"] * 4,  # digits must come back as strings, not ints
        confidences=[0.5] * 8,
        embedding_dims=2,
    )
    path = tmp_path / "model-v3" / "drift-reference.json"
    save_reference(reference, path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    loaded = load_reference(path)
    pd.testing.assert_frame_equal(loaded.frame, reference.frame)
    assert loaded.profile.vocabulary == reference.profile.vocabulary
    new = ["A sharp, warm film.", "Nothing like the others 1999"]
    pd.testing.assert_frame_equal(
        describe(new, loaded.profile), describe(new, reference.profile), check_exact=True
    )


def test_unreadable_reference_files_are_monitoring_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(MonitoringError, match=r"nope\.json not found"):
        load_reference(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(MonitoringError, match="cannot be read"):
        load_reference(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(MonitoringError, match="expected format 'distilld-drift-reference'"):
        load_reference(other)
    reference = fit_reference(REFERENCE_TEXTS, embedding_dims=2)
    truncated = tmp_path / "truncated.json"
    save_reference(reference, truncated)
    doc = json.loads(truncated.read_text())
    doc["columns"]["char_length"].pop()
    truncated.write_text(json.dumps(doc))
    with pytest.raises(MonitoringError, match="'char_length' has 7 values, expected 8"):
        load_reference(truncated)
