"""Logging: every record a socket writes carries its context.

blockws logs to the ``blockws`` logger with stdlib :mod:`logging`. Each
socket's records pass through a :class:`ContextAdapter`, which puts the
socket's ``context`` mapping (at least ``id`` and ``url``) on the record as
``record.ws_context``, so a handler or formatter can show which socket spoke.
Records from other loggers have no ``ws_context``; a format string naming it
would fail on them (``KeyError``), so put a :class:`ContextFilter` on the
handler, which gives those records ``"-"``::

    import logging
    from blockws.log import ContextFilter

    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    logging.basicConfig(
        handlers=[handler], format="%(ws_context)s %(message)s", level=logging.DEBUG
    )

Levels: ``DEBUG`` for the ordinary life of a socket (connecting, a fallback
from HTTP/2 to HTTP/1.1, the close); ``INFO`` and above only for what a user
may act on (a server that broke the protocol, a peer gone silent, a stuck
write). Frame tracing (:func:`blockws.enable_trace`) logs to the
``blockws.trace`` child logger, at ``DEBUG``.

Credentials never reach a record: URLs are logged with their userinfo
redacted, and header values of ``Authorization``, ``Proxy-Authorization``,
``Cookie`` and ``Set-Cookie`` are replaced by ``<redacted>``
(:meth:`blockws.handshake.Headers.redacted`).

Logging runs on whichever thread had something to say (a socket's reader or
writer, the timer thread); handlers must be thread-safe, as the stdlib's are.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

__all__ = ["logger", "ContextAdapter", "ContextFilter", "NO_CONTEXT"]

logger = logging.getLogger("blockws")

#: What :class:`ContextFilter` puts in ``record.ws_context`` for a record
#: that carries no socket context.
NO_CONTEXT = "-"


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


class ContextFilter(logging.Filter):
    """A handler filter that lets ``%(ws_context)s`` format every record.

    A record without ``ws_context`` (from any logger other than a socket's)
    gets :data:`NO_CONTEXT`; a socket's record keeps its mapping. The filter
    never drops a record. Add it to a *handler* (``handler.addFilter``): a
    filter on a logger does not see the records propagated to it from other
    loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "ws_context"):
            record.ws_context = NO_CONTEXT
        return True
