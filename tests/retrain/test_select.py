"""Input selection (deduplication, stratification, hard-example over-sampling) and the
retraining section of the policy, on hand-built candidates."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from distilld.monitoring.config import SamplingConfig
from distilld.retrain.config import DEFAULT_CRON, RetrainingConfig, ScheduleTriggerConfig
from distilld.retrain.data_config import (
    DataSizeConfig,
    GateConfig,
    SelectionConfig,
    default_metric,
    size_category,
)
from distilld.retrain.dedup import jaccard, normalize_text, shingles
from distilld.retrain.select import (
    Candidate,
    SelectionError,
    candidates_from_comparisons,
    candidates_from_traffic,
    select_inputs,
)
from distilld.store.base import StoredComparison, TrafficSample

# No over-sampling at all: every weight is 1, nothing is rare.
FLAT = SelectionConfig(
    low_confidence_factor=1.0,
    disagreement_factor=1.0,
    rare_segment_factor=1.0,
    edge_case_factor=1.0,
    rare_segment_share=0.0,
)


def _sentence(rng: random.Random, n: int = 30) -> str:
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(n))


# --------------------------------------------------------------------------- dedup


def test_normalize_text_folds_case_and_whitespace() -> None:
    assert normalize_text("  Hello\tWORLD \n again ") == "hello world again"


def test_shingles_and_jaccard() -> None:
    assert shingles("a b c d", 3) == {"a b c", "b c d"}
    assert shingles("a b", 3) == {"a b"}
    assert shingles("...", 3) == frozenset()
    assert jaccard({"x", "y"}, {"y", "z"}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 1.0


def test_exact_duplicates_keep_the_first_occurrence() -> None:
    candidates = [
        Candidate("Great movie!", id="1", source="comparison"),
        Candidate("great   MOVIE!", id="2"),
        Candidate("   ", id="3"),
        Candidate("Terrible plot", id="4"),
    ]
    result = select_inputs(candidates, 10, FLAT)
    assert [c.id for c in result.candidates] == ["1", "4"]
    report = result.report
    assert (report.candidates, report.empty, report.exact_duplicates) == (4, 1, 1)
    assert report.eligible == report.selected == 2
    assert report.by_source == {
        "comparison": {"candidates": 1, "selected": 1},
        "traffic": {"candidates": 3, "selected": 1},
    }


def test_near_duplicates_are_removed_at_the_threshold_only() -> None:
    rng = random.Random(1)
    base = _sentence(rng, 60).split()
    one_word = [*base[:30], "changed", *base[31:]]  # 3 of 58 shingles differ
    many_words = [*base[:20], *(f"x{i}" for i in range(20)), *base[40:]]
    a, b, c = " ".join(base), " ".join(one_word), " ".join(many_words)
    j_ab = jaccard(shingles(normalize_text(a)), shingles(normalize_text(b)))
    j_ac = jaccard(shingles(normalize_text(a)), shingles(normalize_text(c)))
    assert j_ab > 0.85 > 0.5 > j_ac

    config = FLAT.model_copy(update={"near_duplicate_threshold": 0.85})
    result = select_inputs(
        [Candidate(a, id="a"), Candidate(b, id="b"), Candidate(c, id="c")], 10, config
    )
    assert [x.id for x in result.candidates] == ["a", "c"]
    assert result.report.near_duplicates == 1

    # Just above the pair's similarity: both kept (the check is exact, not the estimate).
    stricter = FLAT.model_copy(update={"near_duplicate_threshold": min(1.0, j_ab + 1e-9)})
    kept = select_inputs([Candidate(a, id="a"), Candidate(b, id="b")], 10, stricter)
    assert [x.id for x in kept.candidates] == ["a", "b"]


def test_near_duplicate_detection_finds_every_constructed_pair() -> None:
    rng = random.Random(7)
    originals = [_sentence(rng, 40) for _ in range(300)]
    variants = []
    for text in originals:
        words = text.split()
        words[rng.randrange(len(words))] = "edited"
        variants.append(" ".join(words))
    candidates = [Candidate(t, id=f"o{i}") for i, t in enumerate(originals)]
    candidates += [Candidate(t, id=f"v{i}") for i, t in enumerate(variants)]
    config = FLAT.model_copy(update={"near_duplicate_threshold": 0.75})
    result = select_inputs(candidates, 1000, config)
    # One edited word changes at most 3 of 38 shingles: Jaccard >= 35/41 > 0.75.
    assert result.report.near_duplicates == 300
    assert {c.id for c in result.candidates} == {f"o{i}" for i in range(300)}


# --------------------------------------------------------------------------- sampling


def test_selection_is_deterministic_and_in_input_order() -> None:
    rng = random.Random(3)
    candidates = [
        Candidate(_sentence(rng, 12), segment={"src": rng.choice("ab")}, id=str(i))
        for i in range(500)
    ]
    first = select_inputs(candidates, 100, SelectionConfig(), seed=5)
    again = select_inputs(candidates, 100, SelectionConfig(), seed=5)
    other = select_inputs(candidates, 100, SelectionConfig(), seed=6)
    assert [c.id for c in first.candidates] == [c.id for c in again.candidates]
    assert [c.id for c in first.candidates] != [c.id for c in other.candidates]
    ids = [int(c.id or "") for c in first.candidates]
    assert ids == sorted(ids)
    assert len(ids) == 100


def test_strata_are_proportional_without_oversampling() -> None:
    rng = random.Random(4)
    candidates = [Candidate(_sentence(rng), segment={"src": "a"}) for _ in range(900)]
    candidates += [Candidate(_sentence(rng), segment={"src": "b"}) for _ in range(100)]
    result = select_inputs(candidates, 100, FLAT, seed=1)
    assert result.report.by_stratum == {
        "src=a": {"available": 900, "selected": 90},
        "src=b": {"available": 100, "selected": 10},
    }


def test_rare_segments_are_oversampled() -> None:
    rng = random.Random(4)
    candidates = [Candidate(_sentence(rng), segment={"src": "a"}) for _ in range(960)]
    candidates += [Candidate(_sentence(rng), segment={"src": "b"}) for _ in range(40)]
    config = FLAT.model_copy(update={"rare_segment_share": 0.05, "rare_segment_factor": 3.0})
    result = select_inputs(candidates, 100, config, seed=1)
    # Weights: 960 x 1 and 40 x 3 -> b gets 100 * 120 / 1080 = 11.1, not 4.
    assert result.report.rare_segments == ("src=b",)
    assert result.report.by_stratum["src=b"]["selected"] == 11
    assert result.report.selected_by_reason["rare_segment"] == 11


def test_hard_examples_are_oversampled_within_a_stratum() -> None:
    rng = random.Random(9)
    candidates = [
        Candidate(_sentence(rng), student_confidence=0.95, teacher_agreement=1.0)
        for _ in range(800)
    ]
    candidates += [Candidate(_sentence(rng), student_confidence=0.3) for _ in range(100)]
    candidates += [
        Candidate(_sentence(rng), student_confidence=0.9, teacher_agreement=0.0) for _ in range(100)
    ]
    config = SelectionConfig(
        low_confidence_factor=4.0, disagreement_factor=4.0, rare_segment_share=0.0
    )
    result = select_inputs(candidates, 100, config, seed=2)
    chosen = result.report.selected_by_reason
    available = result.report.available_by_reason
    assert available["low_confidence"] == available["disagreement"] == 100
    assert available["ordinary"] == 800
    # Proportional would be 10 each; weight 4 makes each hard group expect about
    # 100 * 400 / 1600 = 25 draws before saturation effects.
    assert chosen["low_confidence"] > 15
    assert chosen["disagreement"] > 15
    assert chosen["ordinary"] < 70
    assert sum(chosen.values()) == 100
    reasons = {item.candidate.student_confidence: item.reasons for item in result.items}
    assert reasons[0.3] == ("low_confidence",)


def test_every_stratum_is_represented_and_capacity_moves_on() -> None:
    rng = random.Random(2)
    candidates = [Candidate(_sentence(rng), segment={"k": "big"}) for _ in range(500)]
    candidates += [Candidate(_sentence(rng), segment={"k": "tiny"}) for _ in range(2)]
    config = SelectionConfig(rare_segment_factor=100.0)
    result = select_inputs(candidates, 50, config, seed=0)
    # tiny's share exceeds its size: it gives both, big fills the rest.
    assert result.report.by_stratum["k=tiny"]["selected"] == 2
    assert result.report.by_stratum["k=big"]["selected"] == 48


def test_fewer_candidates_than_requested_selects_all() -> None:
    result = select_inputs([Candidate("one"), Candidate("two")], 10, SelectionConfig())
    assert result.texts == ("one", "two")
    assert select_inputs([Candidate("one")], 0, SelectionConfig()).texts == ()


def test_bad_requests_are_refused() -> None:
    with pytest.raises(SelectionError, match=">= 0"):
        select_inputs([], -1, SelectionConfig())
    with pytest.raises(SelectionError, match="student_confidence"):
        Candidate("x", student_confidence=1.5)


def test_edge_cases_are_tagged_and_oversampled() -> None:
    sampling = SamplingConfig(length_buckets=[10, 100], segment_keys=["src"])
    samples = [
        TrafficSample(task="t", input_text="short", metadata={"src": "a", "id": [1]},
                      student_output="x", student_confidence=0.9, request_id="r1"),
        TrafficSample(task="t", input_text="a medium length input", metadata={"src": "a"},
                      student_output="x", student_confidence=0.2, request_id="r2"),
    ]  # fmt: skip
    candidates = candidates_from_traffic(samples, sampling)
    assert candidates[0].tags == ("short",)
    assert candidates[0].segment == {"src": "a", "length": "<10"}
    assert candidates[1].tags == ()
    assert candidates[1].segment == {"src": "a", "length": "10-99"}
    plain = candidates_from_traffic(samples)
    assert plain[0].segment == {"src": "a"} and plain[0].tags == ()
    # Metadata not declared in sampling.segment_keys is no segment.
    undeclared = candidates_from_traffic(samples, SamplingConfig(length_buckets=[10, 100]))
    assert undeclared[0].segment == {"length": "<10"}

    result = select_inputs(candidates, 2, SelectionConfig())
    by_id = {item.candidate.id: item for item in result.items}
    assert by_id["r1"].reasons == ("edge_case",)
    assert by_id["r2"].reasons == ("low_confidence",)


def test_candidates_from_comparisons_carry_the_agreement() -> None:
    comparison = StoredComparison(
        task="t",
        request_id="r9",
        segment={"length": "<64"},
        input_text="hi",
        student_output="a",
        student_confidence=0.7,
        model_version="v1",
        teacher_output="b",
        teacher_confidence=0.9,
        teacher_probabilities=None,
        score=0.0,
        schema_valid=True,
    )
    (candidate,) = candidates_from_comparisons([comparison], SamplingConfig())
    assert candidate.teacher_agreement == 0.0
    assert candidate.source == "comparison"
    assert candidate.tags == ("short",)
    result = select_inputs([candidate], 1, SelectionConfig())
    assert result.items[0].reasons == ("disagreement", "edge_case")


def test_report_serialises() -> None:
    report = select_inputs([Candidate("a b c")], 1, SelectionConfig()).report.to_dict()
    assert report["dropped"] == {"empty": 0, "exact_duplicates": 0, "near_duplicates": 0}
    assert report["selected_by_reason"]["ordinary"] == 1


# --------------------------------------------------------------------------- config


def test_data_size_defaults_by_task_kind() -> None:
    size = DataSizeConfig()
    assert size.bounds("classification", 2) == (1_000, 5_000)
    assert size.bounds("classification", 5) == (5_000, 20_000)
    assert size.bounds("extraction") == (5_000, 20_000)
    assert size.bounds("generation") == (50_000, 200_000)
    assert size_category("classification", None) == "multiclass"
    with pytest.raises(ValueError, match="unknown task kind"):
        size_category("chat")


def test_data_size_grows_by_the_factor_up_to_the_maximum() -> None:
    size = DataSizeConfig()
    assert size.grow(1_000, "classification", 2) == 2_000
    assert size.grow(4_000, "classification", 2) == 5_000
    assert size.grow(5_000, "classification", 2) is None
    custom = DataSizeConfig(min_examples=8_000, growth_factor=1.5)
    assert custom.bounds("classification", 2) == (8_000, 8_000)
    assert DataSizeConfig(max_examples=500).bounds("classification", 2) == (500, 500)
    with pytest.raises(ValidationError, match="larger than max_examples"):
        DataSizeConfig(min_examples=200, max_examples=100)


def test_retraining_section_defaults_and_strictness() -> None:
    config = RetrainingConfig()
    assert config.triggers.schedule.cron == DEFAULT_CRON == "0 3 1 */3 *"
    assert config.gate.margin == 0.02
    assert config.split.test == 0.1
    assert config.registry.keep_last >= 2
    with pytest.raises(ValidationError, match="Extra inputs"):
        RetrainingConfig.model_validate({"selection": {"oversample": 2}})
    with pytest.raises(ValidationError):
        config.enabled = False  # type: ignore[misc]  # frozen
    with pytest.raises(ValidationError, match="distinct"):
        RetrainingConfig(seed_files=["a.txt", "a.txt"])
    parsed = RetrainingConfig.model_validate(
        {"triggers": {"on_breach": {"cooldown_s": 60}, "schedule": {"cron": "0  4 * * 1"}}}
    )
    assert parsed.triggers.on_breach.cooldown_s == 60
    assert parsed.triggers.schedule.cron == "0 4 * * 1"


@pytest.mark.parametrize("cron", ["0 3 1 */3", "61 3 * * *", "0 3 1 13 *", "every day"])
def test_bad_cron_expressions_are_refused(cron: str) -> None:
    with pytest.raises(ValidationError, match="cron"):
        ScheduleTriggerConfig(cron=cron)


def test_gate_margins_per_segment() -> None:
    gate = GateConfig(segment_margin=0.05, segment_margins={"difficulty": 0.1, "src=app": 0.03})
    assert gate.margin_for("src=app") == 0.03
    assert gate.margin_for("difficulty=hard") == 0.1
    assert gate.margin_for("src=web") == 0.05
    assert default_metric("extraction") == "field_f1"
    with pytest.raises(ValidationError, match=r"\[0, 1\]"):
        GateConfig(segment_margins={"src=app": 2.0})
