"""Reading a /metrics exposition back with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def families(text: str) -> dict[str, str]:
    """Family name -> type (counters by their name without ``_total``)."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def samples(text: str) -> Samples:
    """Every sample by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(parsed: Samples, name: str, **labels: str) -> float:
    """One sample's value; a KeyError names what was there when it is missing."""
    key = (name, frozenset(labels.items()))
    if key not in parsed:
        near = sorted(str(dict(lab)) for n, lab in parsed if n == name)
        raise KeyError(f"no sample {name}{labels}; samples of that name: {near}")
    return parsed[key]
