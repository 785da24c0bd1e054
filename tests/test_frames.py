"""Frames byte for byte: headers at every length boundary, masking, Frame.parse.

Expected bytes are written out by hand (RFC 6455 section 5.7 examples) or built
from a reference header encoder in this file, never from blockws' own encoder.
"""

from __future__ import annotations

import itertools
import operator
import os
import random
import struct
import sys
import threading
import time
from typing import Any

import pytest
from thorough import examples

import blockws.frames as frames_module
from blockws.exceptions import ProtocolError
from blockws.frames import (
    FIN,
    RSV1,
    RSV2,
    RSV3,
    Frame,
    MaskKeys,
    Opcode,
    apply_mask,
    encode_header,
)

pytestmark = pytest.mark.unit

KEY = bytes((0x37, 0xFA, 0x21, 0x3D))  # the masking key of RFC 6455 section 5.7
BOUNDARY_LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 1 << 20]
DATA_OPCODES = [Opcode.CONT, Opcode.TEXT, Opcode.BINARY]
CONTROL_OPCODES = [Opcode.CLOSE, Opcode.PING, Opcode.PONG]
RESERVED_OPCODES = [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]


def naive_mask(data: bytes, key: bytes) -> bytes:
    """The reference: RFC 6455 5.3, one byte at a time (byte i XOR key[i mod 4])."""
    return bytes(map(operator.xor, data, itertools.cycle(key)))


def reference_header(first: int, length: int, key: bytes | None) -> bytes:
    """RFC 6455 5.2 written out independently of blockws.frames.encode_header."""
    mask = 0x80 if key is not None else 0
    if length <= 125:
        head = bytes([first, mask | length])
    elif length <= 0xFFFF:
        head = bytes([first, mask | 126]) + struct.pack(">H", length)
    else:
        head = bytes([first, mask | 127]) + struct.pack(">Q", length)
    return head + (key or b"")


def payload_of(length: int) -> bytes:
    """``length`` bytes with a period (251) that is not a multiple of the mask's 4."""
    return (bytes(range(251)) * (length // 251 + 1))[:length]


_rng = random.Random(6455)


def random_bytes(n: int) -> bytes:
    return _rng.randbytes(n)


# -- RFC 6455 section 5.7 examples ---------------------------------------------


def test_unmasked_hello() -> None:
    assert Frame(Opcode.TEXT, b"Hello").serialize() == b"\x81\x05Hello"
    assert Frame(Opcode.TEXT, b"Hello").serialize() == bytes(
        [0x81, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F]
    )


def test_masked_hello() -> None:
    expected = bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
    assert Frame(Opcode.TEXT, b"Hello").serialize(KEY) == expected
    assert Frame.parse(expected) == (Frame(Opcode.TEXT, b"Hello"), 11)
    assert Frame.parse(expected, masked=True) == (Frame(Opcode.TEXT, b"Hello"), 11)


def test_fragmented_hello() -> None:
    first = Frame(Opcode.TEXT, b"Hel", fin=False).serialize()
    second = Frame(Opcode.CONT, b"lo").serialize()
    assert first == bytes([0x01, 0x03, 0x48, 0x65, 0x6C])
    assert second == bytes([0x80, 0x02, 0x6C, 0x6F])
    stream = first + second
    parsed = Frame.parse(stream)
    assert parsed == (Frame(Opcode.TEXT, b"Hel", fin=False), 5)
    assert Frame.parse(stream[5:]) == (Frame(Opcode.CONT, b"lo"), 4)


def test_unmasked_ping_and_masked_pong() -> None:
    assert Frame(Opcode.PING, b"Hello").serialize() == bytes(
        [0x89, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F]
    )
    assert Frame(Opcode.PONG, b"Hello").serialize(KEY) == bytes(
        [0x8A, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58]
    )


def test_256_byte_binary_header() -> None:
    payload = bytes(range(256))
    wire = Frame(Opcode.BINARY, payload).serialize()
    assert wire[:4] == bytes([0x82, 0x7E, 0x01, 0x00])
    assert wire[4:] == payload
    assert len(wire) == 260


def test_64kib_binary_header() -> None:
    payload = bytes(65536)
    wire = Frame(Opcode.BINARY, payload).serialize()
    assert wire[:10] == bytes([0x82, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00])
    assert wire[10:] == payload


# -- every length boundary, masked and unmasked ----------------------------------


HAND_HEADERS = {
    0: b"\x82\x00",
    1: b"\x82\x01",
    125: b"\x82\x7d",
    126: b"\x82\x7e\x00\x7e",
    127: b"\x82\x7e\x00\x7f",
    65535: b"\x82\x7e\xff\xff",
    65536: b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00",
    1 << 20: b"\x82\x7f\x00\x00\x00\x00\x00\x10\x00\x00",
}


@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
def test_unmasked_header_at_boundary(length: int) -> None:
    payload = payload_of(length)
    wire = Frame(Opcode.BINARY, payload).serialize()
    head = HAND_HEADERS[length]
    assert wire[: len(head)] == head
    assert wire[len(head) :] == payload
    assert encode_header(FIN | Opcode.BINARY, length, None) == head
    assert Frame.parse(wire, masked=False) == (Frame(Opcode.BINARY, payload), len(wire))


@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
def test_masked_header_at_boundary(length: int) -> None:
    payload = payload_of(length)
    wire = Frame(Opcode.BINARY, payload).serialize(KEY)
    hand = HAND_HEADERS[length]
    head = bytes([hand[0], hand[1] | 0x80]) + hand[2:] + KEY
    assert wire[: len(head)] == head
    assert len(wire) == len(head) + length
    if length <= 4096:
        assert wire[len(head) :] == naive_mask(payload, KEY)
    else:
        assert wire[len(head) :] == apply_mask(payload, KEY)
        assert wire[len(head) : len(head) + 4096] == naive_mask(payload[:4096], KEY)
    assert Frame.parse(wire, masked=True) == (Frame(Opcode.BINARY, payload), len(wire))


@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
@pytest.mark.parametrize("key", [None, KEY, b"\x00\x00\x00\x00", b"\xff\xfe\xfd\xfc"])
def test_round_trip_every_length(length: int, key: bytes | None) -> None:
    frame = Frame(Opcode.BINARY, payload_of(length))
    wire = frame.serialize(key)
    assert wire[: len(reference_header(0x82, length, key))] == reference_header(0x82, length, key)
    assert Frame.parse(wire) == (frame, len(wire))


@pytest.mark.parametrize("opcode", DATA_OPCODES + CONTROL_OPCODES)
@pytest.mark.parametrize("key", [None, KEY])
def test_each_opcode(opcode: Opcode, key: bytes | None) -> None:
    frame = Frame(opcode, b"abc")
    wire = frame.serialize(key)
    assert wire[0] == 0x80 | int(opcode)
    assert wire[1] == (0x83 if key else 0x03)
    assert Frame.parse(wire) == (frame, len(wire))


@pytest.mark.parametrize("fin", [True, False])
@pytest.mark.parametrize(
    "rsv", [0, RSV1, RSV2, RSV3, RSV1 | RSV2, RSV1 | RSV3, RSV2 | RSV3, RSV1 | RSV2 | RSV3]
)
def test_fin_and_rsv_bits(fin: bool, rsv: int) -> None:
    frame = Frame(Opcode.TEXT, b"x", fin=fin, rsv=rsv)
    wire = frame.serialize()
    assert wire == bytes([(0x80 if fin else 0) | rsv | 0x01, 0x01]) + b"x"
    # Frame.parse reports RSV bits as they are; whether they are allowed is the protocol's call.
    assert Frame.parse(wire) == (frame, 3)


def test_rsv_constants() -> None:
    assert (FIN, RSV1, RSV2, RSV3) == (0x80, 0x40, 0x20, 0x10)


# -- Frame.parse: partial input and errors ----------------------------------------


@pytest.mark.parametrize("length", [0, 5, 125, 126, 300, 65536])
@pytest.mark.parametrize("key", [None, KEY])
def test_parse_every_prefix_is_incomplete(length: int, key: bytes | None) -> None:
    wire = Frame(Opcode.BINARY, payload_of(length)).serialize(key)
    cuts = range(len(wire)) if len(wire) < 400 else [0, 1, 2, 3, 5, 9, 10, 13, 14, len(wire) - 1]
    for cut in cuts:
        assert Frame.parse(wire[:cut]) is None, cut
    # Trailing bytes are not consumed.
    assert Frame.parse(wire + b"\x81\x00") == (Frame(Opcode.BINARY, payload_of(length)), len(wire))


def test_parse_accepts_bytearray_and_memoryview() -> None:
    wire = Frame(Opcode.TEXT, b"Hello").serialize(KEY)
    assert Frame.parse(bytearray(wire)) == (Frame(Opcode.TEXT, b"Hello"), 11)
    assert Frame.parse(memoryview(b"zz" + wire)[2:]) == (Frame(Opcode.TEXT, b"Hello"), 11)


@pytest.mark.parametrize("opcode", RESERVED_OPCODES)
def test_parse_rejects_reserved_opcodes(opcode: int) -> None:
    with pytest.raises(ProtocolError, match="reserved opcode"):
        Frame.parse(bytes([0x80 | opcode, 0x00]))


@pytest.mark.parametrize("opcode", CONTROL_OPCODES)
def test_parse_rejects_fragmented_control_frame(opcode: Opcode) -> None:
    with pytest.raises(ProtocolError, match="fragmented control"):
        Frame.parse(bytes([int(opcode), 0x00]))


@pytest.mark.parametrize("opcode", CONTROL_OPCODES)
def test_parse_rejects_long_control_frame(opcode: Opcode) -> None:
    Frame.parse(Frame(opcode, bytes(125)).serialize())  # 125 is fine
    with pytest.raises(ProtocolError, match="longer than 125"):
        Frame.parse(bytes([0x80 | opcode, 126, 0x00, 126]) + bytes(126))


def test_parse_checks_the_mask_bit() -> None:
    masked = Frame(Opcode.TEXT, b"hi").serialize(KEY)
    unmasked = Frame(Opcode.TEXT, b"hi").serialize()
    with pytest.raises(ProtocolError, match="masked frame from a server"):
        Frame.parse(masked, masked=False)
    with pytest.raises(ProtocolError, match="unmasked frame from a client"):
        Frame.parse(unmasked, masked=True)
    assert Frame.parse(unmasked, masked=False) is not None
    assert Frame.parse(masked, masked=True) is not None


def test_parse_rejects_64_bit_length_with_top_bit() -> None:
    with pytest.raises(ProtocolError, match="top bit"):
        Frame.parse(b"\x82\x7f\x80\x00\x00\x00\x00\x00\x00\x00")


def test_parse_accepts_non_minimal_length() -> None:
    # A 5-byte payload announced with the 16-bit form: lenient, like the streaming parser.
    assert Frame.parse(b"\x82\x7e\x00\x05hello") == (Frame(Opcode.BINARY, b"hello"), 9)


# -- masking ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", [KEY, b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x02\x03\x04"]
)
def test_apply_mask_matches_reference_small(key: bytes) -> None:
    data = random_bytes(80)
    for length in range(71):
        for start in range(4):  # every alignment of the data
            chunk = data[start : start + length]
            expected = naive_mask(chunk, key)
            assert apply_mask(chunk, key) == expected, (length, start)
            assert apply_mask(memoryview(data)[start : start + length], key) == expected
            assert apply_mask(bytearray(chunk), key) == expected


@pytest.mark.parametrize("length", [1000, 4093, 4096, 4099, 65535, 65536, 65537, 1 << 20])
def test_apply_mask_matches_reference_large(length: int) -> None:
    data = random_bytes(length + 3)
    for start in range(4):
        chunk = data[start : start + length]
        assert apply_mask(chunk, KEY) == naive_mask(chunk, KEY)


def test_apply_mask_is_an_involution() -> None:
    for length in [0, 1, 2, 3, 4, 5, 63, 64, 65, 1000, 65537]:
        data = random_bytes(length)
        key = random_bytes(4)
        once = apply_mask(data, key)
        assert len(once) == length
        assert apply_mask(once, key) == data
        assert type(once) is bytes


def test_apply_mask_memoryview_input() -> None:
    buf = bytearray(b"....Hello....")
    view = memoryview(buf)[4:9]
    assert apply_mask(view, KEY) == bytes([0x7F, 0x9F, 0x4D, 0x51, 0x58])
    assert buf == bytearray(b"....Hello....")  # the input is not modified
    assert apply_mask(memoryview(b""), KEY) == b""


def test_apply_mask_keeps_leading_and_trailing_zero_bytes() -> None:
    # int.from_bytes/to_bytes must not drop zero bytes at either end.
    assert apply_mask(b"\x00\x00\x00\x00\x00", b"\x00\x00\x00\x00") == b"\x00" * 5
    assert apply_mask(b"\x37\xfa\x21\x3d\x37", KEY) == b"\x00\x00\x00\x00\x00"


def test_mask_keys_are_four_bytes_and_refill_in_batches() -> None:
    keys = MaskKeys()
    drawn = [keys() for _ in range(3 * MaskKeys._BATCH // 4 + 5)]  # crosses batch refills
    assert all(type(k) is bytes and len(k) == 4 for k in drawn)
    assert len(set(drawn)) > len(drawn) // 2  # random, not a constant


@pytest.fixture
def urandom_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every ``os.urandom`` call the key sources make during the test."""
    sizes: list[int] = []
    real_urandom = frames_module.os.urandom

    def urandom(n: int) -> bytes:
        sizes.append(n)
        return real_urandom(n)

    monkeypatch.setattr(frames_module.os, "urandom", urandom)
    return sizes


def test_mask_keys_start_with_a_small_batch_and_double_to_64_kib(urandom_sizes: list[int]) -> None:
    """A socket that sends a few frames read (and kept) 64 KiB of keys: now the
    first batch is 1 KiB and each refill doubles, up to 64 KiB; every key of a
    batch is handed out before the next one is read."""
    sizes = urandom_sizes
    keys = MaskKeys()
    assert sizes == []  # nothing read before the first key
    keys()
    assert sizes == [1024]
    drawn = 1
    for _ in range(8):  # through every size, and past the largest
        drawn_before = len(sizes)
        while len(sizes) == drawn_before:
            keys()
            drawn += 1
        assert drawn == (sum(sizes[:-1]) // 4) + 1  # the refill came after the last key
    assert sizes == [1024, 2048, 4096, 8192, 16384, 32768, 65536, 65536, 65536]


# -- both masking implementations ---------------------------------------------------
# The C speedup (blockws._speedups, built by setup.py when a compiler is present)
# and the pure-Python reference must agree byte for byte; the pure one is also what
# the whole core runs on with BLOCKWS_PURE_PYTHON=1 (.ci/run runs the core tests so).

from typing import Callable  # noqa: E402

from blockws.frames import c_apply_mask, py_apply_mask  # noqa: E402

IMPLS = [pytest.param(py_apply_mask, id="python")]
if c_apply_mask is not None:
    IMPLS.append(pytest.param(c_apply_mask, id="c"))


def test_the_c_speedup_is_built_here() -> None:
    # CI machines have a compiler: a silently missing extension would go unmeasured.
    assert c_apply_mask is not None


_PERIOD_256 = bytes((i * 7 + 3) & 0xFF for i in range(256))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "length",
    # around the C loop's 256-byte switch to 128- and 32-byte steps, too
    [*range(0, 40), 63, 64, 65, 255, 256, 257, 259, 287, 288, 291, 383, 384, 385, 415]
    + [65535, 65536, 65537, 1 << 20],
)
def test_mask_implementations_match_the_reference(
    impl: Callable[[bytes, bytes], bytes], length: int
) -> None:
    data = (_PERIOD_256 * (length // 256 + 1))[:length]  # byte i is (i * 7 + 3) & 0xFF
    key = b"\x9a\x01\xff\x5c"
    expected = naive_mask(data, key)
    assert impl(data, key) == expected
    assert impl(memoryview(data), key) == expected
    assert impl(bytearray(data), key) == expected
    if length > 3:
        assert impl(memoryview(data)[3:], key) == naive_mask(data[3:], key)


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_across_the_pure_paths_switch(impl: Callable[[bytes, bytes], bytes]) -> None:
    """The pure path changes method at frames_module._TRANSLATE_FROM bytes
    (big integers below, byte-translation tables from there): every length
    around it, every alignment of the input, and every byte value of a key."""
    edge = frames_module._TRANSLATE_FROM
    data = random_bytes(edge + 80)
    keys = [bytes((k, k ^ 0x55, 255 - k, (k * 7) & 0xFF)) for k in range(256)]
    for length in range(edge - 9, edge + 9):
        for start in range(4):
            chunk = data[start : start + length]
            key = keys[(length * 4 + start) % 256]
            expected = naive_mask(chunk, key)
            assert impl(chunk, key) == expected, (length, start)
            assert impl(memoryview(data)[start : start + length], key) == expected
    for key in keys:  # every table the translation builds
        assert impl(data, key) == naive_mask(data, key)
    masked = impl(data, KEY)
    assert type(masked) is bytes and impl(masked, KEY) == data


@pytest.mark.skipif(c_apply_mask is None, reason="C speedup not built")
def test_c_mask_rejects_a_bad_key() -> None:
    assert c_apply_mask is not None
    with pytest.raises(ValueError):
        c_apply_mask(b"abc", b"123")


# -- both frame encoders (encode_frame) -------------------------------------------------
# The C encoder (blockws._speedups.encode_frame) and the pure-Python one must
# both give RFC 6455's bytes: the reference header above, then the naive mask.

from blockws.frames import c_encode_frame, py_encode_frame  # noqa: E402

ENCODERS = [pytest.param(py_encode_frame, id="python")]
if c_encode_frame is not None:
    ENCODERS.append(pytest.param(c_encode_frame, id="c"))


@pytest.mark.parametrize("name", ["encode_frame", "split_messages"])
def test_the_c_version_is_built_and_used_here(name: str) -> None:
    """CI machines have a compiler: the C version exists, and is the one in use
    unless BLOCKWS_PURE_PYTHON asks for the pure-Python one."""
    c_version = getattr(frames_module, f"c_{name}")
    assert c_version is not None
    pure = bool(os.environ.get("BLOCKWS_PURE_PYTHON"))
    in_use = getattr(frames_module, name)
    assert in_use is (getattr(frames_module, f"py_{name}") if pure else c_version)


@pytest.mark.parametrize("impl", ENCODERS)
@pytest.mark.parametrize(
    "length",
    [0, 1, 3, 4, 5, 125, 126, 127, 318, 319, 320, 321, 322, 323, 65535, 65536, 65537, 1 << 20],
)
def test_encoders_match_the_reference(impl: Callable[..., bytes], length: int) -> None:
    data = random_bytes(length)
    for first in (FIN | Opcode.BINARY, Opcode.TEXT, FIN | 0x40 | Opcode.TEXT, Opcode.CONT):
        expected = reference_header(first, length, KEY) + naive_mask(data, KEY)
        assert impl(first, data, KEY) == expected
        assert impl(first, memoryview(data), KEY) == expected
        assert impl(first, bytearray(data), KEY) == expected
        assert type(impl(first, data, KEY)) is bytes
    if length > 5:
        assert impl(0x82, memoryview(data)[5:], KEY) == reference_header(
            0x82, length - 5, KEY
        ) + naive_mask(data[5:], KEY)


@pytest.mark.parametrize("impl", ENCODERS)
def test_encoders_reject_a_bad_key_or_first_byte(impl: Callable[..., bytes]) -> None:
    with pytest.raises(ValueError):
        impl(0x82, b"abc", b"123")
    with pytest.raises(ValueError):
        impl(256, b"abc", KEY)
    with pytest.raises(ValueError):
        impl(-1, b"abc", KEY)
    with pytest.raises(TypeError):
        impl(0x81, "text", KEY)


# -- both batch encoders (encode_frames) ------------------------------------------------
# A large message's frames a batch at a time: the C version
# (blockws._speedups.encode_frames) and the pure-Python reference must give the
# reference encoder's frames, one by one, in the same batches.

from blockws.frames import c_encode_frames, py_encode_frames  # noqa: E402

BATCH_ENCODERS = [pytest.param(py_encode_frames, id="python")]
if c_encode_frames is not None:
    BATCH_ENCODERS.append(pytest.param(c_encode_frames, id="c"))


def numbered_keys() -> Any:
    """A key source giving a different key each call, as MaskKeys does."""
    count = itertools.count()
    return lambda: struct.pack(">I", (next(count) * 0x9E3779B1) & 0xFFFFFFFF)


class Taker:
    """``take(count)`` over :func:`numbered_keys`, as MaskKeys.take gives keys
    (the next ``count``, joined), remembering each count asked for."""

    def __init__(self) -> None:
        self.keys = numbered_keys()
        self.counts: list[int] = []

    def __call__(self, count: int) -> bytes:
        self.counts.append(count)
        return b"".join(self.keys() for _ in range(count))


@pytest.mark.parametrize("impl", BATCH_ENCODERS)
@pytest.mark.parametrize(
    ("size", "limit"),
    [(0, 1), (0, 32768), (1, 1), (5, 2), (130, 1), (1000, 7), (125, 125), (126, 125),
     (4097, 4096), (65535, 4096), (65536, 65535), (65537, 65536), (200_000, 32768),
     (200_000, 70_000), (200_000, 1 << 20)],
)  # fmt: skip
def test_encode_frames_gives_the_reference_frames_in_batches(
    impl: Any, size: int, limit: int
) -> None:
    data = random_bytes(size)
    for first, budget in ((Opcode.BINARY, 0), (Opcode.TEXT | 0x40, 5000), (Opcode.BINARY, 1 << 17)):
        expected = []
        ref_keys = numbered_keys()
        for start in range(0, max(size, 1), limit):
            chunk = data[start : start + limit]
            b0 = (FIN if start + limit >= size else 0) | (first if start == 0 else 0)
            key = ref_keys()
            expected.append(reference_header(b0, len(chunk), key) + naive_mask(chunk, key))
        for payload in (data, memoryview(data), bytearray(data)):
            take, got, start = Taker(), [], 0
            while True:
                batch, start = impl(first, payload, start, limit, take, budget)
                assert batch and all(type(f) is bytes for f in batch)
                # Each batch stops as soon as it holds the budget, the last one at the end.
                assert sum(map(len, batch[:-1])) < budget or len(batch) == 1
                assert sum(map(len, batch)) >= budget or start == size
                assert take.counts[-1] == len(batch)  # one take() a batch, for its frames
                got.extend(batch)
                if start == size:
                    break
            assert got == expected


@pytest.mark.parametrize("impl", BATCH_ENCODERS)
def test_encode_frames_rejects_what_encode_frame_rejects(impl: Any) -> None:
    keys = Taker()
    for wrong in (lambda n: b"123", lambda n: b"1234" * (n + 1), lambda n: b"1234" * n + b"1"):
        with pytest.raises(ValueError, match="4 \\* count"):
            impl(0x02, b"abcdef", 0, 2, wrong, 100)  # keys that do not fit the 3 frames
    with pytest.raises(TypeError):
        impl(0x02, b"abc", 0, 1, lambda n: "1234" * n, 0)  # not bytes
    for first in (-1, 0x80, 256):
        with pytest.raises(ValueError):
            impl(first, b"abc", 0, 1, keys, 0)
    with pytest.raises(ValueError):
        impl(0x02, b"abc", 0, 0, keys, 0)  # a limit under 1
    for start in (-1, 4):
        with pytest.raises(ValueError):
            impl(0x02, b"abc", start, 1, keys, 0)
    with pytest.raises(TypeError):
        impl(0x01, "text", 0, 1, keys, 0)

    def failing(count: int) -> bytes:
        raise RuntimeError("no key")

    with pytest.raises(RuntimeError, match="no key"):
        impl(0x02, b"abc", 0, 1, failing, 0)


# -- both batch encoders into a buffer (encode_frames_into) ----------------------------
# The same batches written one frame after the other into a caller's buffer: the C
# version (blockws._speedups.encode_frames_into) and the pure-Python reference must
# give encode_frames' frames, joined, byte for byte, and fail alike.

from blockws.frames import c_encode_frames_into, py_encode_frames_into  # noqa: E402

INTO_ENCODERS = [pytest.param(py_encode_frames_into, id="python")]
if c_encode_frames_into is not None:
    INTO_ENCODERS.append(pytest.param(c_encode_frames_into, id="c"))


@pytest.mark.parametrize("impl", INTO_ENCODERS)
@pytest.mark.parametrize(
    ("size", "limit"),
    [(0, 1), (1, 1), (130, 1), (1000, 7), (126, 125), (65537, 65536), (200_000, 32768),
     (200_000, 70_000), (1 << 20, 32768)],
)  # fmt: skip
def test_encode_frames_into_writes_encode_frames_batches(impl: Any, size: int, limit: int) -> None:
    data = random_bytes(size)
    for first, budget in ((Opcode.BINARY, 0), (Opcode.TEXT | 0x40, 5000), (Opcode.BINARY, 1 << 18)):
        ref_take, take = Taker(), Taker()
        out = bytearray(budget + limit + 14)
        start = ref_start = 0
        while True:
            batch, ref_start = py_encode_frames(first, data, ref_start, limit, ref_take, budget)
            out[:] = b"\xee" * len(out)
            n, start = impl(first, memoryview(data), start, limit, take, budget, out)
            assert (n, start) == (sum(map(len, batch)), ref_start)
            assert out[:n] == b"".join(batch)
            assert out[n:] == b"\xee" * (len(out) - n)  # nothing written past the batch
            assert take.counts == ref_take.counts
            if start == size:
                break


@pytest.mark.parametrize("impl", INTO_ENCODERS)
def test_encode_frames_into_refuses_a_short_or_read_only_buffer(impl: Any) -> None:
    data = bytes(100_000)
    batch, _ = py_encode_frames(2, data, 0, 32768, Taker(), 65536)
    need = sum(map(len, batch))
    with pytest.raises(ValueError, match="shorter than the batch"):
        impl(2, data, 0, 32768, Taker(), 65536, bytearray(need - 1))
    with pytest.raises((TypeError, BufferError)):
        impl(2, data, 0, 32768, Taker(), 65536, bytes(need))  # not writable
    with pytest.raises(ValueError):
        impl(0x80, data, 0, 32768, Taker(), 65536, bytearray(need))  # as encode_frames
    assert impl(2, data, 0, 32768, Taker(), 65536, bytearray(need))[0] == need


# -- both piece encoders (encode_piece_into) ----------------------------------------
# A frame larger than a batch, a piece at a time into one buffer: the C version
# (blockws._speedups.encode_piece_into) and the reference must both give, joined,
# the frames a reference encoder makes with the same keys.

from blockws.frames import c_encode_piece_into, py_encode_piece_into  # noqa: E402

PIECE_ENCODERS = [pytest.param(py_encode_piece_into, id="python")]
if c_encode_piece_into is not None:
    PIECE_ENCODERS.append(pytest.param(c_encode_piece_into, id="c"))


@pytest.mark.parametrize("impl", PIECE_ENCODERS)
@pytest.mark.parametrize(
    ("size", "limit", "budget"),
    [(1, 1, 1), (5, 7, 1), (1000, 7, 3), (1000, 300, 64), (70_000, 65536, 4096),
     (300_000, 1 << 20, 1 << 18), ((1 << 21) + 3, (1 << 20) + 5, 1 << 18),
     (200_001, 70_001, 50_003)],
)  # fmt: skip
def test_encode_piece_into_joins_to_the_frames(
    impl: Any, size: int, limit: int, budget: int
) -> None:
    data = random_bytes(size)
    first = Opcode.BINARY | 0x40
    keys = [os.urandom(4) for _ in range(0, size, limit)]
    expected = b"".join(
        reference_header(
            (0x80 if i + 1 == len(keys) else 0) | (first if i == 0 else 0),
            len(data[i * limit : (i + 1) * limit]),
            key,
        )
        + naive_mask(data[i * limit : (i + 1) * limit], key)
        for i, key in enumerate(keys)
    )
    out = bytearray(budget + 14)
    got = []
    start = 0
    while start < size:
        out[:] = b"\xee" * len(out)
        n, nxt = impl(first, memoryview(data), start, limit, keys[start // limit], budget, out)
        # A piece stops at the budget or at its frame's end, whichever is first.
        assert nxt - start == min(budget, limit - start % limit, size - start)
        assert out[n:] == b"\xee" * (len(out) - n)  # nothing written past the piece
        got.append(bytes(out[:n]))
        start = nxt
    assert b"".join(got) == expected


@pytest.mark.parametrize("impl", PIECE_ENCODERS)
def test_encode_piece_into_refuses_bad_arguments(impl: Any) -> None:
    data, key = bytes(1000), b"abcd"
    assert impl(2, data, 0, 300, key, 100, bytearray(108)) == (108, 100)  # 4 + 4 + 100
    assert impl(2, data, 100, 300, key, 100, bytearray(100)) == (100, 200)  # no header
    with pytest.raises(ValueError, match="shorter than the piece"):
        impl(2, data, 0, 300, key, 100, bytearray(107))
    with pytest.raises((TypeError, BufferError)):
        impl(2, data, 0, 300, key, 100, bytes(108))  # not writable
    for bad in (
        (0x80, data, 0, 300, key, 100),  # first: RSV bits and opcode only
        (2, data, 1000, 300, key, 100),  # start past the payload
        (2, data, -1, 300, key, 100),
        (2, data, 0, 0, key, 100),  # limit
        (2, data, 0, 300, key, 0),  # budget
        (2, data, 0, 300, b"abc", 100),  # key
    ):
        with pytest.raises(ValueError):
            impl(*bad, bytearray(200))


# -- both scatter helpers (scatter_views, scan_scattered) -------------------------------
# The C versions (blockws._speedups) and the pure-Python references must agree:
# the same places in the same order, the same frames taken and the same stop.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from blockws.frames import (  # noqa: E402
    SCAN_FIN,
    SCAN_MISMATCH,
    SCAN_MORE,
    SCAN_PARTIAL,
    c_scan_scattered,
    c_scatter_views,
    py_scan_scattered,
    py_scatter_views,
)

VIEW_MAKERS = [pytest.param(py_scatter_views, id="python")]
if c_scatter_views is not None:
    VIEW_MAKERS.append(pytest.param(c_scatter_views, id="c"))
SCANNERS = [pytest.param(py_scan_scattered, id="python")]
if c_scan_scattered is not None:
    SCANNERS.append(pytest.param(c_scan_scattered, id="c"))


@pytest.mark.parametrize("impl", VIEW_MAKERS)
@pytest.mark.parametrize(("start", "base", "frames"), [(0, 0, 0), (0, 0, 3), (5, 20, 2), (7, 7, 1)])
def test_scatter_views_are_the_rest_then_header_and_payload_places(
    impl: Any, start: int, base: int, frames: int
) -> None:
    into, spare = bytearray(100), bytearray(12)
    length, head = 25, 4
    views = impl(memoryview(into), memoryview(spare), start, base, length, frames, head)
    places = [(start, base, "into")] if start < base else []
    for i in range(frames):
        places.append((i * head, (i + 1) * head, "spare"))
        places.append((base + i * length, base + (i + 1) * length, "into"))
    assert len(views) == len(places)
    for view, (a, b, which) in zip(views, places):
        owner = into if which == "into" else spare
        assert type(view) is memoryview and view.obj is owner and not view.readonly
        view[:] = bytes([len(view) % 251]) * len(view)  # writes land in the owner's slice
        assert owner[a:b] == bytes([(b - a) % 251]) * (b - a)


@pytest.mark.parametrize("impl", VIEW_MAKERS)
def test_scatter_views_refuse_places_past_the_buffers(impl: Any) -> None:
    into, spare = memoryview(bytearray(100)), memoryview(bytearray(8))
    for args in (
        (0, 60, 25, 2, 4),  # past into
        (0, 0, 25, 3, 4),  # past spare
        (5, 4, 25, 1, 4),  # start after base
        (0, 0, 0, 1, 4),
        (0, 0, 25, -1, 4),
    ):
        with pytest.raises(ValueError):
            impl(into, spare, *args)
    with pytest.raises(TypeError):
        impl(bytearray(100), spare, 0, 0, 25, 1, 4)


def scatter_headers(kinds: str, length: int) -> tuple[bytes, bytes, bytes]:
    """(headers, more, last) for frames of ``length``: ``m`` a continuation,
    ``l`` the final one, ``x`` something else of the same size."""
    if length < 65536:
        size = bytes((126,)) + length.to_bytes(2, "big")
    else:
        size = bytes((127,)) + length.to_bytes(8, "big")
    more, last, other = bytes((0x00,)) + size, bytes((0x80,)) + size, bytes((0x89,)) + size
    headers = b"".join({"m": more, "l": last, "x": other}[k] for k in kinds)
    return headers, more, last


@pytest.mark.parametrize("impl", SCANNERS)
@pytest.mark.parametrize(
    ("kinds", "n", "expected"),
    [
        ("mmm", 0, (0, 0, 0, False, SCAN_MORE)),
        ("mmm", 3, (0, 3, 0, False, SCAN_MORE)),  # a header cut short
        ("mmm", 4, (1, 0, 0, False, SCAN_PARTIAL)),  # a header alone
        ("mmm", 4 + 300, (1, 0, 300, False, SCAN_MORE)),
        ("mmm", 2 * 304 + 10, (3, 0, 10 - 4, False, SCAN_PARTIAL)),
        ("mmm", 3 * 304, (3, 0, 300, False, SCAN_MORE)),  # the plan's frames, whole
        ("mml", 3 * 304 + 50, (3, 50, 300, True, SCAN_FIN)),  # and what followed
        ("mlm", 3 * 304, (2, 304, 300, True, SCAN_FIN)),
        ("mxm", 3 * 304, (1, 608, 300, False, SCAN_MISMATCH)),
        ("xmm", 100, (0, 100, 0, False, SCAN_MISMATCH)),
        ("mml", 2 * 304 + 4 + 299, (3, 0, 299, True, SCAN_PARTIAL)),
    ],
)  # fmt: skip
def test_scan_scattered_takes_the_guessed_frames(
    impl: Any, kinds: str, n: int, expected: tuple[int, int, int, bool, int]
) -> None:
    headers, more, last = scatter_headers(kinds, 300)
    assert impl(bytearray(headers), 4, more, last, n, 300, len(kinds)) == expected


@pytest.mark.parametrize("impl", SCANNERS)
def test_scan_scattered_refuses_bad_arguments(impl: Any) -> None:
    headers, more, last = scatter_headers("mm", 300)
    for args in (
        (headers, 4, more, last, 10, 300, 3),  # more frames than headers
        (headers, 0, more, last, 10, 300, 2),
        (headers, 4, more[:3], last, 10, 300, 2),
        (headers, 4, more, last, -1, 300, 2),
        (headers, 4, more, last, 10, 0, 2),
        (headers, 4, more, last, 10, 300, -1),
    ):
        with pytest.raises(ValueError):
            impl(*args)


@given(
    kinds=st.text(alphabet="mlx", max_size=8),
    length=st.sampled_from([126, 300, 65535, 65536, 70_000]),
    n=st.integers(0, 700_000),
)
@settings(max_examples=300, deadline=None)
def test_hypothesis_both_scans_agree(kinds: str, length: int, n: int) -> None:
    if c_scan_scattered is None:
        pytest.skip("the C speedups are not built")
    headers, more, last = scatter_headers(kinds, length)
    head = len(more)
    args = (bytearray(headers), head, more, last, n, length, len(kinds))
    assert c_scan_scattered(*args) == py_scan_scattered(*args)


# -- both fast receive loops (split_messages) -----------------------------------------
# The C loop (blockws._speedups.split_messages) and the pure-Python reference
# (frames.py_split_messages) must agree byte for byte: the messages, their types,
# and the offset where each stops -- before anything it does not take, so that the
# general parser finds every error, in the same order, whichever loop ran first.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from blockws.frames import c_split_messages, py_split_messages  # noqa: E402
from blockws.protocol import BinaryMessage, TextMessage  # noqa: E402

SPLITS = [pytest.param(py_split_messages, id="python")]
if c_split_messages is not None:
    SPLITS.append(pytest.param(c_split_messages, id="c"))


def split_all(impl: Any, buf: Any, pos: int = 0, small: int = 65535, wrapped: bool = False) -> Any:
    out: list[Any] = []
    wraps = (BinaryMessage, TextMessage) if wrapped else (None, None)
    stop = impl(buf, pos, small, out, *wraps)
    summary = []
    for item in out:
        if isinstance(item, BinaryMessage):
            assert type(item.data) is bytes and len(item.data) == item.length
            summary.append(("B", item.data))
        elif isinstance(item, TextMessage):
            summary.append(("T", item.text))
        else:
            summary.append((type(item).__name__, item))
    return stop, summary


def frame(
    opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, key: bytes | None = None
) -> bytes:
    return Frame(opcode, payload, fin, rsv).serialize(key)


@pytest.mark.parametrize("impl", SPLITS)
@pytest.mark.parametrize("wrapped", [False, True])
def test_split_takes_whole_small_data_frames(impl: Any, wrapped: bool) -> None:
    stream = (
        frame(Opcode.TEXT, "héllo".encode())
        + frame(Opcode.BINARY, b"")
        + frame(Opcode.BINARY, b"\x00" * 125)
        + frame(Opcode.BINARY, b"\x01" * 126)
        + frame(Opcode.TEXT, b"z" * 65535)
    )
    stop, got = split_all(impl, stream, wrapped=wrapped)
    assert stop == len(stream)
    b, t = ("B", "T") if wrapped else ("bytes", "str")
    assert got == [(t, "héllo"), (b, b""), (b, b"\x00" * 125), (b, b"\x01" * 126), (t, "z" * 65535)]


STOPPERS = {
    "cut header": frame(Opcode.BINARY, b"x" * 200)[:3],
    "cut payload": frame(Opcode.BINARY, b"x" * 200)[:-1],
    "one byte": b"\x82",
    "ping": frame(Opcode.PING, b"p"),
    "close": frame(Opcode.CLOSE, b"\x03\xe8"),
    "first fragment": frame(Opcode.TEXT, b"ab", fin=False),
    "continuation": frame(Opcode.CONT, b"ab"),
    "rsv1": frame(Opcode.BINARY, b"ab", rsv=RSV1),
    "masked": frame(Opcode.BINARY, b"ab", key=KEY),
    "masked 16-bit": frame(Opcode.BINARY, b"a" * 300, key=KEY),
    "64-bit length": frame(Opcode.BINARY, b"a" * 65536),
    "reserved opcode": bytes((0x83, 0)),
    "bad utf-8": frame(Opcode.TEXT, b"ok\xff"),
    "cut utf-8": frame(Opcode.TEXT, "é".encode()[:1]),
    "surrogate": frame(Opcode.TEXT, b"\xed\xa0\x80"),
    "over small": frame(Opcode.BINARY, b"a" * 1001),
}


@pytest.mark.parametrize("impl", SPLITS)
@pytest.mark.parametrize("stopper", sorted(STOPPERS))
def test_split_stops_before_anything_else(impl: Any, stopper: str) -> None:
    head = frame(Opcode.TEXT, b"a") + frame(Opcode.BINARY, b"b")
    stream = head + STOPPERS[stopper]
    if not stopper.startswith(("cut", "one")):  # (a cut frame would take the next one's bytes)
        stream += frame(Opcode.TEXT, b"after")
    stop, got = split_all(impl, stream, small=1000)
    assert stop == len(head)
    assert got == [("str", "a"), ("bytes", b"b")]


ALONE = {
    **STOPPERS,
    "text": frame(Opcode.TEXT, "héllo".encode()),
    "empty text": frame(Opcode.TEXT, b""),
    "binary": frame(Opcode.BINARY, b"\x00\xff" * 10),
    "empty binary": frame(Opcode.BINARY, b""),
    "125 bytes": frame(Opcode.BINARY, b"x" * 125),
    "126 bytes": frame(Opcode.BINARY, b"x" * 126),
    "a byte more": frame(Opcode.BINARY, b"ab") + b"\x82",
    "a byte less": frame(Opcode.TEXT, b"ab")[:-1],
}


@pytest.mark.parametrize("name", sorted(ALONE))
@pytest.mark.parametrize("small", [0, 1, 5, 125, 65535])
@pytest.mark.parametrize("wrapped", [False, True])
def test_split_of_one_frame_agrees_with_the_loop(name: str, small: int, wrapped: bool) -> None:
    """``bytes`` that may be one small frame take py_split_messages' shortcut;
    a bytearray of the same bytes takes its loop; and the C loop: all agree."""
    buf = ALONE[name]
    expected = split_all(py_split_messages, bytearray(buf), 0, small, wrapped)
    assert split_all(py_split_messages, buf, 0, small, wrapped) == expected
    if c_split_messages is not None:
        assert split_all(c_split_messages, buf, 0, small, wrapped) == expected


@pytest.mark.parametrize("impl", SPLITS)
def test_split_starts_at_pos_and_accepts_buffers(impl: Any) -> None:
    stream = b"junk" + frame(Opcode.BINARY, b"xy") + frame(Opcode.TEXT, b"z")
    for buf in (stream, bytearray(stream), memoryview(stream)):
        assert split_all(impl, buf, 4) == (len(stream), [("bytes", b"xy"), ("str", "z")])
    assert split_all(impl, stream, len(stream)) == (len(stream), [])
    for pos in (-1, len(stream) + 1):
        with pytest.raises(ValueError):
            split_all(impl, stream, pos)


@pytest.mark.parametrize("impl", SPLITS)
def test_split_lets_a_wrappers_error_through_and_keeps_what_came_before(impl: Any) -> None:
    out: list[Any] = []

    def boom(text: str) -> Any:
        raise RuntimeError("wrapper")

    stream = frame(Opcode.BINARY, b"1") + frame(Opcode.TEXT, b"2")
    with pytest.raises(RuntimeError, match="wrapper"):
        impl(stream, 0, 65535, out, None, boom)
    assert out == [b"1"]


_chunks = st.one_of(
    st.builds(lambda p: frame(Opcode.TEXT, p), st.text(max_size=300).map(str.encode)),
    st.builds(lambda p: frame(Opcode.BINARY, p), st.binary(max_size=300)),
    st.builds(lambda p: frame(Opcode.TEXT, p), st.binary(max_size=8)),  # often not UTF-8
    st.binary(min_size=1, max_size=6),  # garbage
    st.sampled_from(sorted(STOPPERS.values())),
)


@settings(max_examples=examples(300), deadline=None, derandomize=True, database=None)
@given(
    st.lists(_chunks, max_size=12),
    st.integers(0, 20),
    st.sampled_from([0, 1, 125, 126, 300, 65535]),
    st.booleans(),
)
def test_hypothesis_both_splits_agree_byte_for_byte(
    chunks: list[bytes], pos: int, small: int, wrapped: bool
) -> None:
    stream = b"".join(chunks)
    pos = min(pos, len(stream))
    expected = split_all(py_split_messages, stream, pos, small, wrapped)
    if c_split_messages is not None:
        assert split_all(c_split_messages, stream, pos, small, wrapped) == expected
    # Every message it took is whole, and the rest starts at a frame it did not take.
    assert pos <= expected[0] <= len(stream)


# -- both continuation loops (copy_continuations) ---------------------------------------
# The C loop (blockws._speedups.copy_continuations) and the pure-Python reference
# (frames.py_copy_continuations): the same bytes copied to the same place, and
# the same stop, before the first frame either does not take. The protocol
# tests run _binary_run with and without the C loop (tests/test_protocol.py).

from blockws.frames import c_copy_continuations, py_copy_continuations  # noqa: E402

COPIES = [pytest.param(py_copy_continuations, id="python")]
if c_copy_continuations is not None:
    COPIES.append(pytest.param(c_copy_continuations, id="c"))


def copy_all(
    impl: Any, buf: Any, pos: int, room: int, m_len: int, limit: int, m_frames: int
) -> tuple[tuple[int, int, int], bytes]:
    target = bytearray(b"\xee" * room)
    end = len(buf)
    result = impl(buf, pos, end, memoryview(target), m_len, limit, m_frames)
    return result, bytes(target)


def cont(payload: bytes, fin: bool = False, rsv: int = 0, key: bytes | None = None) -> bytes:
    return frame(Opcode.CONT, payload, fin, rsv, key)


@pytest.mark.parametrize("impl", COPIES)
def test_copy_takes_whole_non_final_continuations(impl: Any) -> None:
    stream = b"".join(
        [cont(b"a" * 3), cont(b""), cont(b"b" * 126), cont(b"c" * 70000), cont(b"z", fin=True)]
    )
    (pos, m_len, m_frames), target = copy_all(impl, stream, 0, 80000, 5, -1, 0)
    assert pos == len(stream) - 3  # stopped before the final frame
    assert m_len == 5 + 3 + 126 + 70000
    assert m_frames == 0  # counted only under a limit
    assert target[:5] == b"\xee" * 5 and target[5:m_len] == b"a" * 3 + b"b" * 126 + b"c" * 70000
    assert target[m_len:] == b"\xee" * (80000 - m_len)


STOPS_BEFORE = {
    "final": cont(b"x", fin=True),
    "data frame": frame(Opcode.BINARY, b"x", fin=False),
    "ping": frame(Opcode.PING, b"p"),
    "rsv1": cont(b"x", rsv=4),
    "masked": cont(b"x", key=b"abcd"),
    "masked 126": cont(b"x" * 200, key=b"abcd"),
    "cut payload": cont(b"x" * 10)[:-1],
    "cut 16-bit length": cont(b"x" * 200)[:3],
    "cut 64-bit length": cont(b"x" * 70000)[:9],
    "64-bit top bit": b"\x00\x7f" + (1 << 63).to_bytes(8, "big") + b"x",
    "one byte": b"\x00",
}


@pytest.mark.parametrize("impl", COPIES)
@pytest.mark.parametrize("stopper", sorted(STOPS_BEFORE))
def test_copy_stops_before_anything_else(impl: Any, stopper: str) -> None:
    head = cont(b"h" * 4)
    # (Nothing after a frame cut short: a read's end cuts it.)
    tail = b"" if stopper.startswith("cut") or stopper == "one byte" else cont(b"t" * 4)
    stream = head + STOPS_BEFORE[stopper] + tail
    (pos, m_len, _), target = copy_all(impl, stream, 0, 100_000, 0, -1, 0)
    assert (pos, m_len) == (len(head), 4)
    assert target[:4] == b"hhhh"


@pytest.mark.parametrize("impl", COPIES)
def test_copy_stops_at_the_limits_and_the_room(impl: Any) -> None:
    stream = cont(b"a" * 10) + cont(b"b" * 10) + cont(b"c" * 10)
    one = len(cont(b"a" * 10))
    # The message's size: 7 + 10 + 10 = 27 fits a limit of 27, the third does not.
    assert copy_all(impl, stream, 0, 100, 7, 27, 0)[0] == (2 * one, 27, 2)
    # Frames: fewer than the limit so far, else stop (m_frames counts under a limit).
    assert copy_all(impl, stream, 0, 100, 0, 1000, 998)[0] == (2 * one, 20, 1000)
    # The room in the target: 25 bytes hold two payloads after 5.
    (result, target) = copy_all(impl, stream, 0, 25, 5, -1, 0)
    assert result == (2 * one, 25, 0) and target[5:] == b"a" * 10 + b"b" * 10
    # From an offset, within a read's end (end < len(buf)).
    (result, _) = copy_all(impl, b"junk" + stream, 4, 100, 0, -1, 0)
    assert result == (4 + 3 * one, 30, 0)
    assert impl(stream, 0, one + 2, bytearray(100), 0, -1, 0) == (one, 10, 0)


@pytest.mark.parametrize("impl", COPIES)
def test_copy_rejects_bad_offsets_and_a_read_only_target(impl: Any) -> None:
    stream = cont(b"a" * 10)
    for pos, end, m_len in ((-1, len(stream), 0), (5, 4, 0), (0, len(stream) + 1, 0), (0, 0, 101)):
        with pytest.raises(ValueError):
            impl(stream, pos, end, bytearray(100), m_len, -1, 0)
    with pytest.raises(BufferError):
        impl(stream, 0, len(stream), b"\x00" * 100, 0, -1, 0)
    with pytest.raises(BufferError):
        impl(stream, 0, len(stream), memoryview(b"\x00" * 100), 0, -1, 0)


_cont_chunks = st.one_of(
    st.binary(max_size=300).map(cont),
    st.binary(max_size=300).map(lambda b: cont(b, fin=True)),
    st.binary(min_size=126, max_size=70000).map(cont),
    st.binary(max_size=20).map(lambda b: cont(b, rsv=4)),
    st.binary(max_size=20).map(lambda b: cont(b, key=b"\x01\x02\x03\x04")),
    st.binary(max_size=20).map(lambda b: frame(Opcode.PING, b)),
    st.binary(max_size=6),  # garbage, or a header cut short
)


@settings(max_examples=examples(300), deadline=None, derandomize=True, database=None)
@given(
    st.lists(_cont_chunks, max_size=10),
    st.integers(0, 20),
    st.integers(0, 40),
    st.integers(0, 100_000),
    st.integers(0, 20),
    st.sampled_from([-1, 0, 50, 1000, 70_000, 200_000]),
    st.integers(0, 1200),
)
def test_hypothesis_both_copies_agree_byte_for_byte(
    chunks: list[bytes], pos: int, cut: int, room: int, m_len: int, limit: int, m_frames: int
) -> None:
    stream = b"".join(chunks)
    stream = stream[: max(0, len(stream) - cut)]
    pos = min(pos, len(stream))
    m_len = min(m_len, room)
    expected = copy_all(py_copy_continuations, stream, pos, room, m_len, limit, m_frames)
    if c_copy_continuations is not None:
        assert copy_all(c_copy_continuations, stream, pos, room, m_len, limit, m_frames) == expected
    (stop, new_len, _), _ = expected
    assert pos <= stop <= len(stream) and m_len <= new_len <= room


# -- masking keys across threads (RFC 6455 5.3) -----------------------------------------


def draw_interleaved(
    codes: set[Any], draw: Callable[[int, list[bytes]], None], threads: int = 4
) -> list[bytes]:
    """Run ``draw(index, out)`` on ``threads`` threads at once, with the GIL
    handed to another thread at every bytecode of the functions whose code
    objects are in ``codes`` (the worst interleaving there is); returns every
    thread's ``out``, joined."""

    def at_every_opcode(frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            time.sleep(0)  # releases the GIL right here
        return at_every_opcode

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code in codes:
            frame.f_trace_opcodes = True
            return at_every_opcode
        return None

    drawn: list[list[bytes]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def run(index: int) -> None:
        sys.settrace(tracer)
        try:
            start.wait()
            draw(index, drawn[index])
        finally:
            sys.settrace(None)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    return [key for out in drawn for key in out]


def test_mask_keys_never_repeat_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: MaskKeys was drawn from without a lock by the writer, the reader
    (pongs), the timer (pings) and ping(). Four threads draw keys while a
    tracer hands the GIL to another thread at every bytecode of the key
    source, the worst interleaving there is. The OS source is replaced by one
    whose 4-byte words are all different, so any repeated key is a slice of a
    batch handed out twice, never chance."""
    words = itertools.count()
    monkeypatch.setattr(
        frames_module.os,
        "urandom",
        lambda n: b"".join(struct.pack(">I", next(words)) for _ in range(n // 4)),
    )

    class SmallBatches(MaskKeys):
        _BATCH = 64  # refills often, so they race too

    keys = SmallBatches()

    def draw(index: int, out: list[bytes]) -> None:
        for _ in range(150):
            out.append(keys())

    everything = draw_interleaved({MaskKeys.__call__.__code__, MaskKeys._refill.__code__}, draw)
    assert len(everything) == 600
    assert len(set(everything)) == len(everything)


def test_mask_keys_from_the_os_are_distinct_beyond_chance() -> None:
    keys = MaskKeys()
    drawn = [keys() for _ in range(50_000)]
    assert all(len(key) == 4 for key in drawn)
    # 50 000 draws from 2**32 values: ~0.3 repeats expected by chance.
    assert len(drawn) - len(set(drawn)) <= 5


def test_client_protocols_share_one_key_source(urandom_sizes: list[int]) -> None:
    """Probe "soak: RSS growth": every socket had its own key batch, doubling up
    to 64 KiB as it sent, so a 500-socket soak's RSS kept growing for its 10
    minutes (up to 32 MiB of keys in all). Now the process has one source:
    100 client protocols drawing a key each read one 1 KiB batch, not 100."""
    from blockws.frames import shared_mask_keys
    from blockws.protocol import Protocol, Role

    sizes = urandom_sizes
    shared_mask_keys.reset()
    frames = [Protocol(Role.CLIENT).encode_data(Opcode.BINARY, b"x")[0] for _ in range(100)]
    assert sizes == [1024]
    keys = [frame[2:6] for frame in frames]  # 2-byte header, then the key
    assert len(set(keys)) == 100
    assert b"".join(Protocol(Role.SERVER).encode_data(Opcode.BINARY, b"x")) == b"\x82\x01x"


@pytest.mark.timeout(30)
def test_a_forked_child_does_not_reuse_its_parents_keys() -> None:
    """The shared source is reset in a forked child: parent and child draw
    different keys after the fork (run in a fresh interpreter, with no other
    threads, to fork safely)."""
    import subprocess

    script = """
import os
from blockws.frames import shared_mask_keys
shared_mask_keys()  # a batch read before the fork
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, b"".join(shared_mask_keys() for _ in range(8)))
    os._exit(0)
os.waitpid(pid, 0)
child = os.read(r, 64)
parent = b"".join(shared_mask_keys() for _ in range(8))
print(child != parent and len(child) == 32)
"""
    if not hasattr(__import__("os"), "fork"):
        pytest.skip("no fork() here")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == "True", out.stderr


# -- a run of messages at once (the writer's batch) ---------------------------------------

MESSAGE_ENCODERS = [pytest.param(frames_module.py_encode_messages, id="python")]
if frames_module.c_encode_messages is not None:
    MESSAGE_ENCODERS.append(pytest.param(frames_module.c_encode_messages, id="c"))


def reference_run(items: list[tuple[Any, ...]], start: int, limit: int) -> tuple[bytes, int]:
    """What encode_messages must give, from this file's reference encoder."""
    keys = numbered_keys()
    out = b""
    end = start
    while end < len(items) and items[end][0] >= 0 and len(items[end][1]) <= limit:
        opcode, payload = items[end][0], bytes(items[end][1])
        key = keys()
        out += reference_header(FIN | (opcode & 0x0F), len(payload), key) + naive_mask(payload, key)
        end += 1
    return out, end


@pytest.mark.parametrize("impl", MESSAGE_ENCODERS)
def test_encode_messages_gives_the_reference_frames(impl: Any) -> None:
    """Each item one FIN frame with its own key, in order, joined; around
    every header length, in three buffer types, with the caller's flags above
    the opcode ignored; the run stops at a negative opcode (the writer's close
    frame) or a payload over the limit; take() is asked once, for the run's
    count, and not at all for an empty run."""
    sizes = [0, 1, 3, 4, 5, 64, 124, 125, 126, 127, 1000, 65535, 65536, 70_000]
    makers = (bytes, bytearray, memoryview)
    items: list[tuple[Any, ...]] = []
    for i, size in enumerate(sizes):
        opcode = (Opcode.TEXT, Opcode.BINARY, Opcode.BINARY | 0x100)[i % 3]
        items.append((opcode, makers[i % 3](random_bytes(size)), None, size))
    items.insert(6, (-1, b"\x88\x80abcd", None, 0))  # a close frame ends a run
    for limit in (0, 1, 125, 126, 65535, 65536, 1 << 20):
        for start in range(len(items) + 1):
            take = Taker()
            got = impl(items, start, limit, take)
            expected = reference_run(items, start, limit)
            assert got == expected and type(got[0]) is bytes, (limit, start)
            assert take.counts == ([expected[1] - start] if expected[1] > start else [])


@pytest.mark.parametrize("impl", MESSAGE_ENCODERS)
def test_encode_messages_rejects_bad_arguments(impl: Any) -> None:
    items = [(Opcode.BINARY, b"abc"), (Opcode.TEXT, b"de")]
    for start in (-1, 3):
        with pytest.raises(ValueError):
            impl(items, start, 10, Taker())
    for wrong in (lambda count: b"1234" * count + b"5", lambda count: b"123"):
        with pytest.raises(ValueError):
            impl(items, 0, 10, wrong)  # keys of the wrong length
    with pytest.raises(ZeroDivisionError):
        impl(items, 0, 10, lambda count: 1 // 0)  # take's own error comes through
    with pytest.raises(TypeError):
        impl([("binary", b"abc")], 0, 10, Taker())


def test_c_encode_messages_fails_when_take_changes_the_items() -> None:
    """take() is Python code that runs between the C version's two passes:
    items it changes make an error, never a write past the frames' end."""
    if frames_module.c_encode_messages is None:
        pytest.skip("the C speedups are not built")
    encode = frames_module.c_encode_messages
    for change in (
        lambda items: items.pop(),  # fewer items
        lambda items: items.__setitem__(1, (Opcode.BINARY, b"x" * 50)),  # a longer payload
        lambda items: items.__setitem__(1, (-1, b"")),  # a close frame
        lambda items: items.__setitem__(1, (Opcode.BINARY, bytearray(b"y"))),  # shorter
    ):
        items: list[tuple[Any, ...]] = [(Opcode.BINARY, b"abc"), (Opcode.BINARY, b"de")]

        def take(count: int, items: list[tuple[Any, ...]] = items, change: Any = change) -> bytes:
            change(items)
            return b"1234" * count

        with pytest.raises(RuntimeError, match="changed"):
            encode(items, 0, 100, take)
    with pytest.raises(TypeError):
        encode((("x", b"a"),), 0, 10, Taker())  # a tuple of items, not a list
    with pytest.raises(TypeError):
        encode([[Opcode.BINARY, b"a"]], 0, 10, Taker())  # an item that is not a tuple


@pytest.fixture
def counting_urandom(monkeypatch: pytest.MonkeyPatch) -> Any:
    """An OS source whose 4-byte words count up: a key tells where it came
    from. Returns a function that starts the count again."""
    words = [itertools.count()]
    monkeypatch.setattr(
        frames_module.os,
        "urandom",
        lambda n: b"".join(struct.pack(">I", next(words[0])) for _ in range(n // 4)),
    )
    return lambda: words.__setitem__(0, itertools.count())


def test_mask_keys_take_gives_what_as_many_calls_give(counting_urandom: Any) -> None:
    """take(count) is count calls' keys in one slice, across refills (the
    1 KiB first batch, then larger ones) and for counts larger than a batch."""
    counts = (1, 3, 250, 10, 300, 5000, 20_000, 1)
    calling = MaskKeys()
    calls = [b"".join(calling() for _ in range(count)) for count in counts] + [calling()]
    counting_urandom()  # the same words again
    taking = MaskKeys()
    assert taking.take(0) == b""
    assert [taking.take(count) for count in counts] + [taking()] == calls


def test_mask_keys_take_never_repeats_across_threads(counting_urandom: Any) -> None:
    """Two threads take runs while two call for single keys, with the GIL
    handed to another thread at every bytecode of the key source (as in
    test_mask_keys_never_repeat_across_threads): no key is handed out
    twice, including when a run's slice of the batch was interleaved."""

    class SmallBatches(MaskKeys):
        _BATCH = 64

    keys = SmallBatches()

    def draw(index: int, out: list[bytes]) -> None:
        for i in range(100):
            if index < 2:
                run = keys.take(1 + i % 7)
                out += [run[j : j + 4] for j in range(0, len(run), 4)]
            else:
                out.append(keys())

    codes = {MaskKeys.__call__.__code__, MaskKeys._refill.__code__, MaskKeys.take.__code__}
    everything = draw_interleaved(codes, draw)
    assert len(everything) == 2 * sum(1 + i % 7 for i in range(100)) + 200
    assert len(set(everything)) == len(everything)


# -- what a read's messages count in the queue ---------------------------------------------

LENGTH_COUNTERS = [pytest.param(frames_module.py_total_length, id="python")]
if frames_module.c_total_length is not None:
    LENGTH_COUNTERS.append(pytest.param(frames_module.c_total_length, id="c"))


class Sized:
    """A message object with its own ``__len__`` (as BinaryMessage has)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("impl", LENGTH_COUNTERS)
def test_total_length_is_the_sum_of_the_lengths(impl: Any) -> None:
    class Text(str):
        pass

    text = "h\u00e9llo \u263a"  # 7 characters, 10 bytes in UTF-8
    messages: list[Any] = [b"", b"abc", text, Sized(70_000), bytearray(5), Text("xy")]
    assert impl(messages) == sum(map(len, messages)) == 3 + 7 + 70_000 + 5 + 2
    assert impl([]) == 0

    class Broken:
        def __len__(self) -> int:
            raise RuntimeError("no length")

    with pytest.raises(RuntimeError, match="no length"):
        impl([b"a", Broken()])


def test_c_total_length_reads_the_list_again_after_a_len_that_shrinks_it() -> None:
    if frames_module.c_total_length is None:
        pytest.skip("the C speedups are not built")
    messages: list[Any] = []

    class Shrinking:
        def __len__(self) -> int:
            messages.clear()  # what len() may do: the loop must not read past the end
            return 4

    messages += [b"ab", Shrinking(), b"never counted"]
    assert frames_module.c_total_length(messages) == 6
    with pytest.raises(TypeError):
        frames_module.c_total_length((b"a",))


# -- BytesBuffer: a bytes object read into, then handed out ------------------------------

needs_bytes_buffer = pytest.mark.skipif(
    frames_module.c_BytesBuffer is None, reason="the C speedups are not built"
)


@needs_bytes_buffer
def test_bytes_buffer_hands_out_what_was_written_as_bytes() -> None:
    make = frames_module.c_BytesBuffer
    assert make is not None
    buf = make(10)
    assert len(buf) == 10
    view = memoryview(buf)
    assert not view.readonly and view.nbytes == 10
    view[:4] = b"abcd"
    view[4:] = b"efghij"
    view.release()
    data = buf.take(10)
    assert type(data) is bytes and data == b"abcdefghij"
    assert hash(data) == hash(b"abcdefghij")  # (no stale cached hash)
    assert len(buf) == 0  # empty once taken
    with pytest.raises(ValueError, match="taken"):
        memoryview(buf)
    with pytest.raises(ValueError, match="taken"):
        buf.take(0)


@needs_bytes_buffer
@pytest.mark.parametrize("n", [0, 1, 5000, (1 << 20) - 1])
def test_bytes_buffer_take_shrinks_to_the_length_asked(n: int) -> None:
    make = frames_module.c_BytesBuffer
    assert make is not None
    buf = make(1 << 20)
    payload = os.urandom(n)
    memoryview(buf)[:n] = payload
    assert buf.take(n) == payload


@needs_bytes_buffer
def test_bytes_buffer_refuses_to_be_taken_while_a_view_lives() -> None:
    """Nothing may write into the bytes once it is out: take() waits for
    every view (slices of a view count too) to go."""
    make = frames_module.c_BytesBuffer
    assert make is not None
    buf = make(8)
    view = memoryview(buf)
    piece = view[2:4]
    view.release()  # the slice still holds the export
    with pytest.raises(BufferError, match="views"):
        buf.take(8)
    piece[:] = b"zz"
    piece.release()
    assert buf.take(8)[2:4] == b"zz"


@needs_bytes_buffer
def test_bytes_buffer_rejects_bad_sizes() -> None:
    make = frames_module.c_BytesBuffer
    assert make is not None
    with pytest.raises(ValueError, match="negative"):
        make(-1)
    with pytest.raises(TypeError):
        make("8")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        make(size=8)  # type: ignore[call-arg]
    buf = make(4)
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="outside"):
            buf.take(bad)
    assert buf.take(4) is not None
    assert make(0).take(0) == b""


@needs_bytes_buffer
def test_bytes_buffers_free_their_memory() -> None:
    """Taken or dropped (a message cut short by a failure), nothing stays."""
    import tracemalloc

    make = frames_module.c_BytesBuffer
    assert make is not None
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            buf = make(256 * 1024)
            memoryview(buf)[:3] = b"abc"
            if i & 1:
                assert buf.take(100 * 1024)[:3] == b"abc"
            del buf
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024
