"""The fuzzer's bytes as choices, and the pieces and frames the targets share."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

from blockws.frames import RSV1, Frame, Opcode

__all__ = ["Input", "pieces", "ws_frames"]


class Input:
    """The fuzzer's bytes as a stream of choices (like atheris' FuzzedDataProvider,
    which this keeps out of the targets so they run without atheris too).

    Choices come from the front; the rest is data. Past the end every choice
    is 0 and every read empty, so any input is valid.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, n: int) -> int:
        """A number in ``range(n)`` (n <= 65536)."""
        if n <= 256:
            return self.byte() % n
        return ((self.byte() << 8) | self.byte()) % n

    def bool(self) -> bool:
        return bool(self.byte() & 1)

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def cuts(self, total: int) -> list[int]:
        """Up to 8 sorted cut points in ``range(1, total)``."""
        if total < 2:
            return []
        return sorted({1 + self.int(total - 1) for _ in range(self.int(9))})


def pieces(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    """``data`` cut at ``cuts``."""
    start = 0
    for cut in cuts:
        yield data[start:cut]
        start = cut
    yield data[start:]


def ws_frames(server: bool) -> list[bytes]:
    """Valid frames of each kind (masked when ``server`` is the reader): seeds."""
    key = b"\x01\x02\x03\x04" if server else None
    comp = zlib.compressobj(1, zlib.DEFLATED, -15)
    deflated = (comp.compress(b"hello hello hello") + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]
    return [
        Frame(Opcode.TEXT, "héllo".encode()).serialize(key),
        Frame(Opcode.BINARY, bytes(range(200))).serialize(key),
        Frame(Opcode.TEXT, b"frag", fin=False).serialize(key)
        + Frame(Opcode.PING, b"p").serialize(key)
        + Frame(Opcode.CONT, b"ment").serialize(key),
        Frame(Opcode.BINARY, b"a" * 70000)
        .serialize(key)[:40],
        Frame(Opcode.TEXT, deflated, rsv=RSV1).serialize(key),
        Frame(Opcode.CLOSE, b"\x03\xe8bye").serialize(key),
        Frame(Opcode.PONG, b"").serialize(key) + Frame(Opcode.CLOSE, b"").serialize(key),
        # Two binary messages in frames of 40 bytes, a ping among the second's: the
        # second's reads may be scattered over its guessed frames.
        b"".join(
            Frame(Opcode.BINARY if i in (0, 4) else Opcode.CONT, bytes([i]) * 40, fin=i in (3, 7))
            .serialize(key)
            + (Frame(Opcode.PING, b"!").serialize(key) if i == 5 else b"")
            for i in range(8)
        ),
    ]
