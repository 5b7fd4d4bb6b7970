"""The admin token of the ops server: which routes need it, checking it, masking it.

Every admin action, and ``GET /admin/status`` unless it was made public, needs
``Authorization: Bearer <token>`` (compared in constant time). Without a
configured token these are refused (403) with a message saying how to set one;
a missing or wrong token gets 401 with ``WWW-Authenticate: Bearer``. The token
never appears in a log line, a response or a repr: :func:`mask` and
:func:`mask_body` replace it wherever it would be echoed.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from pydantic import SecretStr

from distilld.ops.server import HttpError

TOKEN_SETTINGS = "DISTILLD_ADMIN_TOKEN or DISTILLD_ADMIN_TOKEN_FILE"
PUBLIC_STATUS_SETTING = "DISTILLD_HTTP_PUBLIC_STATUS"
_REDACTED = "**********"
#: Routes that always need the admin token; ``status`` needs it unless public_status.
_ADMIN_ACTIONS = frozenset({"retrain", "promote", "rollback"})


def needs_token(route: str, *, public_status: bool) -> bool:
    """Whether a route needs the admin token: the admin actions always, the admin
    status unless it was made public; health, readiness and metrics never."""
    return route in _ADMIN_ACTIONS or (route == "status" and not public_status)


def authorize(
    token: SecretStr | None, authorization: str | None, *, status: bool, log: Any
) -> None:
    """Raise :class:`HttpError` (403 without a configured token, 401 without the right
    bearer token) unless ``authorization`` carries ``token``. ``status``: the route is
    the admin status (the 403 then also says how to make it public)."""
    if token is None:
        raise HttpError(
            403,
            f"the admin API is disabled: no admin token is configured; set {TOKEN_SETTINGS} "
            "and send it as 'Authorization: Bearer <token>'"
            + (
                f" (or set {PUBLIC_STATUS_SETTING}=true to read the status without a token)"
                if status
                else ""
            ),
        )
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if not authorization or scheme.lower() != "bearer" or not credentials.strip():
        log.warning("ops.admin_unauthorized", why="no bearer token")
        raise HttpError(
            401,
            "this endpoint needs 'Authorization: Bearer <token>' (the admin token)",
            (("WWW-Authenticate", 'Bearer realm="distilld"'),),
        )
    # Headers arrive decoded as latin-1: encoding back gives the bytes sent.
    sent = credentials.strip().encode("latin-1", errors="replace")
    expected = token.get_secret_value().encode("utf-8")
    if not hmac.compare_digest(sent, expected):
        log.warning("ops.admin_unauthorized", why="wrong token")
        raise HttpError(
            401,
            "the admin token is wrong",
            (("WWW-Authenticate", 'Bearer realm="distilld", error="invalid_token"'),),
        )


def mask(token: SecretStr | None, text: str) -> str:
    """``text`` with the admin token masked, in case anything ever echoes it."""
    if token is None:
        return text
    secret = token.get_secret_value()
    return text.replace(secret, _REDACTED) if secret else text


def mask_body(token: SecretStr | None, body: bytes) -> bytes:
    """A reply body with the admin token masked, as sent and as escaped in JSON."""
    if token is None:
        return body
    secret = token.get_secret_value()
    for form in {secret, json.dumps(secret, ensure_ascii=False)[1:-1]}:
        body = body.replace(form.encode("utf-8"), _REDACTED.encode("ascii"))
    return body


class Scrubbed(Exception):
    """Carries an exception's traceback into the log with the token masked in messages.

    structlog's ``format_exc_info`` renders ``exc_info`` given as an exception
    instance; passing this wrapper keeps the frames but not the raw message."""

    def __init__(self, original: BaseException, scrub: Callable[[str], str]) -> None:
        super().__init__(scrub(f"{type(original).__name__}: {original}"))
        self.__traceback__ = original.__traceback__
