"""The one helper that bounds what the daemon repeats of a received value."""

from __future__ import annotations

from distilld.echo import CUT_MARK, ECHO_CHARS, clip, clip_fields, quote


def test_clip_keeps_short_text_and_cuts_long_text_with_a_mark() -> None:
    assert clip("short") == "short"
    assert clip("x" * ECHO_CHARS) == "x" * ECHO_CHARS
    assert clip("x" * (ECHO_CHARS + 1)) == "x" * ECHO_CHARS + CUT_MARK
    assert clip("abcdef", 3) == "abc" + CUT_MARK


def test_quote_is_bounded_whatever_the_characters() -> None:
    # repr writes U+0085 as 4 characters, an unprintable astral character as 10.
    for char in ("\u0085", "\U000e0001", "a", "'"):
        quoted = quote(char * 600_000)
        assert len(quoted) <= 10 * ECHO_CHARS + 2 + len(CUT_MARK)
        assert quoted.endswith(CUT_MARK)
    assert quote("task") == "'task'"


def test_clip_fields_reaches_into_containers() -> None:
    big = "y" * 10_000
    out = clip_fields({"a": big, big: [big, (big, 3)], "n": 5, "none": None}, limit=10)
    assert out == {
        "a": "y" * 10 + CUT_MARK,
        "y" * 10 + CUT_MARK: ["y" * 10 + CUT_MARK, ["y" * 10 + CUT_MARK, 3]],
        "n": 5,
        "none": None,
    }


def test_clip_fields_bounds_deep_nesting_by_its_repr() -> None:
    deep: list[object] = ["z" * 10_000]
    for _ in range(50):
        deep = [deep]
    out = clip_fields(deep, limit=100)
    assert len(str(out)) < 1_000
