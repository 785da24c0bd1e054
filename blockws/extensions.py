"""The extension seam (RFC 6455 section 9): how an extension plugs into blockws.

An :class:`Extension` takes part in two places:

* **the opening handshake** -- :meth:`Extension.offer` gives its
  ``Sec-WebSocket-Extensions`` offer, and :meth:`Extension.accept` checks the
  server's answer (raising :class:`~blockws.exceptions.NegotiationError` when
  it is invalid);
* **the frame path** of :class:`~blockws.protocol.Protocol` -- outgoing data
  messages pass through :meth:`Extension.encode` (on the writer thread), and
  incoming data is fed through :meth:`Extension.decode` chunk by chunk as it
  arrives (on the reader thread), so a decoder can enforce memory bounds while
  it works. An extension owns the RSV bits in :attr:`Extension.rsv_bits`;
  frames with any other RSV bit set fail the connection with 1002.

Extensions are sans-I/O like the rest of the core. One instance serves one
connection: :meth:`Extension.fresh` makes the per-connection copy, so the
object a user passes as an option can be reused for many sockets.

permessage-deflate (RFC 7692, :mod:`blockws.deflate`) is built on this seam,
and a socket offers it by default.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Union

__all__ = ["Extension", "parse_extension_header", "ExtensionParams"]

#: The parameters of one extension in a header: ``[(name, value or None), ...]``.
ExtensionParams = Sequence[tuple[str, Union[str, None]]]


class Extension:
    """Base class of WebSocket extensions. Subclasses override what they use.

    The default implementations are the identity: an extension that only
    overrides :meth:`offer` and :meth:`accept` negotiates without touching
    frames.
    """

    #: The extension token, e.g. ``"permessage-deflate"``.
    name: str = ""
    #: The RSV bits this extension may set (``frames.RSV1`` etc.).
    rsv_bits: int = 0
    #: For a message in one frame with all of :attr:`rsv_bits` set, whether
    #: ``begin_message()`` is sure to claim it and may be skipped: the parser's
    #: fast path for such frames (permessage-deflate's compressed text and
    #: binary) then calls only ``decode(payload, True, limit)``.
    claims_by_rsv: bool = False

    def fresh(self) -> Extension:
        """A new instance with the same settings and no connection state."""
        return copy.copy(self)

    # -- handshake ----------------------------------------------------------

    def offer(self) -> str:
        """The offer for the ``Sec-WebSocket-Extensions`` request header."""
        return self.name

    def accept(self, params: ExtensionParams) -> None:
        """Check the server's accepted parameters; raise ``NegotiationError`` if invalid."""

    # -- frame path ---------------------------------------------------------

    def encode(self, opcode: int, payload: bytes) -> tuple[bytes, int]:
        """Transform an outgoing data message: returns ``(payload, rsv_bits)``.

        Called on the writer thread, once per message, before fragmentation.
        """
        return payload, 0

    def begin_message(self, opcode: int, rsv: int) -> bool:
        """Called for the first frame of each incoming data message.

        Returns whether :meth:`decode` should transform this message's data.
        """
        return False

    def decode(self, data: bytes, end: bool, limit: int) -> bytes:
        """Transform incoming message data, fed in arrival order.

        ``end`` is True for the message's last chunk. ``limit`` is how many
        more decoded bytes the message may grow by: produce more and the
        connection fails with 1009 (raise ``MessageTooBig`` early to stop
        work sooner).
        """
        return data

    def decode_run(
        self,
        buf: bytes,
        pos: int,
        room: int,
        limit: int | None,
        budget: int | None,
        inflated: int,
        out: list[Any],
        wrap: Callable[[str], Any] | None,
        wrap_binary: Callable[[bytes, int], Any] | None,
    ) -> tuple[int, int]:
        """A fast path for the parser, optional: decode a run of whole messages,
        each in one frame whose first byte is ``0xC1`` or ``0xC2`` (text or
        binary, FIN, all of :attr:`rsv_bits`; only asked of an extension that
        :attr:`claims_by_rsv` ``RSV1``), from ``buf[pos:]``, appending text as
        ``str`` (through ``wrap`` unless it is None) and binary as ``bytes``
        (through ``wrap_binary(data, len(data))`` unless it is None) to
        ``out``; returns ``(pos, inflated)``, where it stopped and
        ``inflated`` plus the bytes decoded. It must do exactly what
        ``decode(payload, True, room)`` and the parser's checks would, frame
        after frame: at most ``limit`` bytes a message, the parser's UTF-8
        check for text, the same exceptions in the same order, and no frame
        once ``inflated`` reached ``budget``. The default decodes nothing:
        ``(pos, inflated)``."""
        return pos, inflated

    def close(self) -> None:
        """The socket has ended: free per-connection state (compressors, ...).
        Called once, on the thread that tears the socket down."""


def parse_extension_header(value: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Split a ``Sec-WebSocket-Extensions`` value into ``[(name, params)]``.

    ``"a; x=1, b"`` gives ``[("a", [("x", "1")]), ("b", [])]``. Quoted
    parameter values are unquoted. Raises ``ValueError`` on an empty name.
    """
    result: list[tuple[str, list[tuple[str, str | None]]]] = []
    for item in value.split(","):
        parts = [p.strip() for p in item.split(";")]
        if not parts[0]:
            if len(parts) == 1:
                continue
            raise ValueError(f"empty extension name in {value!r}")
        params: list[tuple[str, str | None]] = []
        for part in parts[1:]:
            if not part:
                continue
            key, eq, val = part.partition("=")
            key = key.strip()
            if not key:
                raise ValueError(f"empty extension parameter in {value!r}")
            if eq:
                val = val.strip()
                if len(val) >= 2 and val[0] == val[-1] == '"':
                    val = val[1:-1]
                params.append((key, val))
            else:
                params.append((key, None))
        result.append((parts[0], params))
    return result
