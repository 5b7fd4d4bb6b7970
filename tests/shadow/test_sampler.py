"""The sampling decision: segments, rates and boosts, with a seeded random source."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from distilld.monitoring.config import SamplingConfig
from distilld.shadow.sampler import SegmentValues, TaskSampling, decide, segment_of
from distilld.vocabulary import length_bucket

CONFIG = SamplingConfig(
    base_rate=0.1,
    min_per_segment=3,
    low_confidence_threshold=0.6,
    low_confidence_boost=4.0,
    edge_case_boost=2.0,
    edge_case_oov_share=0.5,
    length_buckets=[10, 100],
)
TYPICAL = "a typical review of medium length"  # 33 characters: the middle bucket
SATURATED = Counter({("length", "10-99"): 100, ("source", "app"): 100})


class FixedRandom(random.Random):
    """random() always returns ``value``: the sampling threshold becomes observable."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_length_buckets() -> None:
    assert [length_bucket(n, [10, 100]) for n in (0, 9, 10, 99, 100, 5000)] == [
        "<10",
        "<10",
        "10-99",
        "10-99",
        ">=100",
        ">=100",
    ]
    assert length_bucket(5, [64]) == "<64"
    assert length_bucket(64, [64]) == ">=64"


def test_segments_come_from_declared_scalar_metadata_and_length() -> None:
    metadata = {
        "source": "app",
        "tier": 2,
        "beta": True,
        "tags": ["a", "b"],
        "extra": None,
        "country": "x" * 100,
        "length": "ignored: the length bucket wins",
    }
    segment = segment_of(TYPICAL, metadata, CONFIG, keys=set(metadata))
    assert segment == {
        "source": "app",
        "tier": "2",
        "beta": "true",
        "country": "x" * 64,
        "length": "10-99",
    }
    assert segment_of(TYPICAL, metadata, CONFIG, keys={"source"}) == {
        "source": "app",
        "length": "10-99",
    }
    # Undeclared metadata is never a segment (sampling.segment_keys unset: none is).
    assert segment_of(TYPICAL, metadata, CONFIG) == {"length": "10-99"}


def test_undeclared_metadata_never_makes_a_request_a_rare_segment() -> None:
    # A producer setting a unique value per request (an id, a timestamp, an attack)
    # must not get every request compared at rate 1.
    rng = random.Random(7)
    decisions = [
        decide(TYPICAL, {"id": f"unique-{i}"}, 0.9, CONFIG, SATURATED, rng) for i in range(2000)
    ]
    assert all(d.segment == {"length": "10-99"} for d in decisions)
    assert all(d.probability == pytest.approx(CONFIG.base_rate) for d in decisions)
    assert sum(d.sample for d in decisions) < 2000 * 0.15


def test_segment_values_keep_a_bounded_number_per_key() -> None:
    values = SegmentValues(max_values=3, idle_after=100)
    admitted = [values.admit({"source": f"s{i}", "length": "10-99"}) for i in range(10)]
    assert [a["source"] for a in admitted] == ["s0", "s1", "s2"] + ["other"] * 7
    assert all(a["length"] == "10-99" for a in admitted)  # the length bucket passes
    assert values.tracked("source") == ["s0", "s1", "s2"]
    # A tracked value keeps its place; "other" itself takes none.
    assert values.admit({"source": "s1"}) == {"source": "s1"}
    assert values.admit({"source": "other"}) == {"source": "other"}
    assert values.tracked("source") == ["s0", "s2", "s1"]


def test_an_idle_value_gives_its_place_up_but_a_busy_one_does_not() -> None:
    values = SegmentValues(max_values=2, idle_after=5)
    values.admit({"source": "old"})
    for _ in range(6):
        values.admit({"source": "busy"})
    # "old" was last seen 6 requests ago (> idle_after): the new value takes its place.
    assert values.admit({"source": "new"}) == {"source": "new"}
    assert values.tracked("source") == ["busy", "new"]
    # Both were seen within the last 5 requests: a newcomer is pooled.
    assert values.admit({"source": "newer"}) == {"source": "other"}
    with pytest.raises(ValueError, match="at least 1"):
        SegmentValues(max_values=0, idle_after=5)


def test_base_rate_once_every_segment_has_its_minimum() -> None:
    metadata = {"source": "app"}
    keys = ["source"]
    below = decide(TYPICAL, metadata, 0.95, CONFIG, SATURATED, FixedRandom(0.099), keys=keys)
    above = decide(TYPICAL, metadata, 0.95, CONFIG, SATURATED, FixedRandom(0.1), keys=keys)
    assert below.sample and not above.sample
    assert below.probability == pytest.approx(0.1)
    assert below.reasons == ()
    assert below.segment == {"source": "app", "length": "10-99"}


def test_sampled_share_follows_the_base_rate() -> None:
    rng = random.Random(1234)
    decisions = [decide(TYPICAL, {}, 0.9, CONFIG, SATURATED, rng) for _ in range(5000)]
    share = sum(d.sample for d in decisions) / len(decisions)
    assert 0.08 < share < 0.12


def test_rare_segment_is_always_sampled_until_it_has_its_minimum() -> None:
    counts = Counter(SATURATED)
    counts[("source", "kiosk")] = 2
    decision = decide(
        TYPICAL, {"source": "kiosk"}, 0.95, CONFIG, counts, FixedRandom(0.999), keys=["source"]
    )
    assert decision.sample
    assert decision.probability == 1.0
    assert "source=kiosk" in decision.reasons[-1]
    counts[("source", "kiosk")] = 3
    decision = decide(
        TYPICAL, {"source": "kiosk"}, 0.95, CONFIG, counts, FixedRandom(0.999), keys=["source"]
    )
    assert not decision.sample
    # An unseen segment counts as 0.
    unseen = decide(
        TYPICAL, {"source": "new"}, 0.95, CONFIG, counts, FixedRandom(0.999), keys=["source"]
    )
    assert unseen.sample


def test_low_confidence_boosts_the_rate() -> None:
    decision = decide(TYPICAL, {}, 0.55, CONFIG, SATURATED, FixedRandom(0.39))
    assert decision.probability == pytest.approx(0.4)
    assert decision.sample
    assert decision.reasons == ("low confidence (0.550 < 0.6)",)
    # Unknown confidence is not low.
    unknown = decide(TYPICAL, {}, None, CONFIG, SATURATED, FixedRandom(0.39))
    assert unknown.probability == pytest.approx(0.1)


def test_edge_cases_boost_the_rate() -> None:
    short_counts = Counter({("length", "<10"): 100})
    long_counts = Counter({("length", ">=100"): 100})
    short = decide("meh", {}, 0.9, CONFIG, short_counts, FixedRandom(0.5))
    long = decide("x" * 150, {}, 0.9, CONFIG, long_counts, FixedRandom(0.5))
    strange = decide(TYPICAL, {}, 0.9, CONFIG, SATURATED, FixedRandom(0.5), oov_share=0.8)
    for decision in (short, long, strange):
        assert decision.probability == pytest.approx(0.2)
        assert decision.reasons[0].startswith("edge case")
    assert "out-of-vocabulary" in strange.reasons[0]
    plain = decide(TYPICAL, {}, 0.9, CONFIG, SATURATED, FixedRandom(0.5), oov_share=0.2)
    assert plain.probability == pytest.approx(0.1)


def test_boosts_multiply_and_the_rate_is_capped_at_one() -> None:
    both = decide("meh", {}, 0.1, CONFIG, Counter({("length", "<10"): 100}), FixedRandom(0.79))
    assert both.probability == pytest.approx(0.8)  # 0.1 x 4 x 2
    assert both.sample
    capped_config = CONFIG.model_copy(update={"base_rate": 0.5})
    capped = decide("meh", {}, 0.1, capped_config, Counter({("length", "<10"): 9}), random.Random())
    assert capped.probability == 1.0


def test_rate_zero_never_samples_and_decisions_are_reproducible() -> None:
    off = CONFIG.model_copy(update={"base_rate": 0.0, "min_per_segment": 0})
    assert not any(decide(TYPICAL, {}, 0.1, off, {}, FixedRandom(0.0)).sample for _ in range(10))
    first = [decide(TYPICAL, {}, 0.9, CONFIG, SATURATED, random.Random(5)) for _ in range(3)]
    second = [decide(TYPICAL, {}, 0.9, CONFIG, SATURATED, random.Random(5)) for _ in range(3)]
    assert first == second


def test_task_sampling_seeds_only_declared_keys() -> None:
    sampling = TaskSampling(SamplingConfig(segment_keys=["source"], min_per_segment=2), 10)
    sampling.seed([{"source": "app", "length": "<64", "undeclared": "x"}] * 2)
    decision = sampling.decide("short", {"source": "app"}, 0.99, random.Random(0))
    # Both declared segments have their 2 comparisons: no rare-segment reason.
    assert not any("segment below" in r for r in decision.reasons)
    fresh = TaskSampling(SamplingConfig(segment_keys=["source"], min_per_segment=2), 10)
    rare = fresh.decide("short", {"source": "app"}, 0.99, random.Random(0))
    assert rare.sample and any("segment below" in r for r in rare.reasons)
