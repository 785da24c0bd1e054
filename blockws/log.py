"""Logging: every record a socket writes carries its context.

blockws logs to the ``blockws`` logger with stdlib :mod:`logging`. Each
socket's records pass through a :class:`ContextAdapter`, which puts the
socket's ``context`` mapping (at least ``id`` and ``url``) on the record as
``record.ws_context``, so a handler or formatter can show which socket spoke::

    logging.basicConfig(format="%(ws_context)s %(message)s", level=logging.DEBUG)

Credentials never reach a record: URLs are logged with their password
replaced, and header values of ``Authorization``, ``Proxy-Authorization``,
``Cookie`` and ``Set-Cookie`` are replaced by ``<redacted>``
(:meth:`blockws.handshake.Headers.redacted`).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

__all__ = ["logger", "ContextAdapter"]

logger = logging.getLogger("blockws")


class ContextAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger adapter that attaches a live, mutable context mapping."""

    def __init__(
        self, context: MutableMapping[str, Any], base: logging.Logger | None = None
    ) -> None:
        super().__init__(base or logger, {})
        self.context = context

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra["ws_context"] = self.context
        kwargs["extra"] = extra
        return msg, kwargs
