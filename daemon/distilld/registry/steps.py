"""Named steps of a registry change, for the crash tests.

Each change of the registry calls :func:`step` with the name of the point it
reached (``register:staged``, ``promote:pointer_written``, ``lock:acquired``,
...). Tests set :data:`_test_hook` in a subprocess to crash between steps;
None in production.
"""

from __future__ import annotations

from collections.abc import Callable

_test_hook: Callable[[str], None] | None = None


def step(name: str) -> None:
    if _test_hook is not None:
        _test_hook(name)
