"""How much of a received value the daemon repeats back: the one place that bounds echoes.

Anything that comes from outside (a request's task, id or metadata, a record
key, an exception message that quotes them, an answer from a model) reaches a
log line, an alert or a dead-letter record only cut by these functions, so one
oversized field never makes an oversized line or record. The log renderer
applies :func:`clip_fields` to every event as a last line of defence
(:mod:`distilld.log`); code that echoes a received value clips it where it
builds the message, to the shorter :data:`ECHO_CHARS`.

Pure functions; imports nothing of the daemon.
"""

from __future__ import annotations

from typing import Any

#: How many characters of a received value a message repeats.
ECHO_CHARS = 200
#: The longest string any field of a log line may hold (a traceback included).
LOG_FIELD_CHARS = 8_000
#: Marks a cut (after the kept characters).
CUT_MARK = "..."


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters, :data:`CUT_MARK` appended when cut."""
    return text if len(text) <= limit else text[:limit] + CUT_MARK


def quote(text: str, limit: int = ECHO_CHARS) -> str:
    """``repr(text)`` of at most ``limit`` characters of ``text`` (a cut is marked
    after the closing quote). Bounded whatever the characters: ``repr`` writes a
    character in at most 10."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + CUT_MARK


def clip_fields(value: Any, limit: int = LOG_FIELD_CHARS, depth: int = 4) -> Any:
    """``value`` with every string in it (dict keys and values, list and tuple
    items, ``depth`` levels down) clipped to ``limit`` characters; a container
    deeper than that becomes its clipped ``repr``. Other values are returned as
    they are."""
    if isinstance(value, str):
        return clip(value, limit)
    if isinstance(value, dict | list | tuple | set | frozenset):
        if depth <= 0:
            return clip(repr(value), limit)
        if isinstance(value, dict):
            return {
                clip_fields(k, limit, depth - 1): clip_fields(v, limit, depth - 1)
                for k, v in value.items()
            }
        return [clip_fields(item, limit, depth - 1) for item in value]
    return value
