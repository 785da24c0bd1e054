"""The Autobahn TestSuite client cases of categories 1-7, 9 and 10, as data for fuzzserver.

Transcribed from crossbario/autobahn-testsuite, ``autobahntestsuite/autobahntestsuite/case/``
(``case1_1_1.py`` ... ``case10_1_1.py``, ``case6_x_x.py``, ``case7_7_X.py``,
``case7_9_X.py``, ``case9_7_X.py``). Each case keeps Autobahn's id, description and
expectation; the steps mirror its ``onOpen`` (``sendFrame`` -> ``Frame``, ``sendMessage`` ->
``Message``, ``sendClose`` / ``sendCloseFrame`` -> ``Close``, ``continueLater`` -> ``Wait``,
``killAfter`` / ``closeAfter`` -> ``KillAfter`` / ``CloseAfter``) and ``expected`` /
``expectedClose`` are copied as they are.

Differences from Autobahn:

* Category 9 runs at Autobahn's full sizes (16M single messages, 4M in 65536 frames of 64
  octets, 1M in 16384 writes of 64 octets, 1000 round trips); on this machine the whole
  category takes a few seconds with the `websockets` client. The case time limit is 60 s
  instead of Autobahn's 100 s. ``Case.scaled`` is there to note a scaled-down case.
* Echoed payloads are compared byte for byte in category 9 (Autobahn compares lengths).
* 5.19 / 5.20 also check what their expectation text says: the first Pong arrives before
  the rest of the message is sent (the 1 s pause), not only in the right order.
* 7.9.x uses the invalid close codes of the current suite (0, 999, 1004, 1005, 1006, 1016,
  1100, 2000, 2999); older releases also sent 1012-1015 as "invalid".

Categories 12 and 13 (permessage-deflate) are in ``autobahn_deflate_cases.py``. None of the
cases here has a ``deflate`` policy, so the fuzzer ignores a client's permessage-deflate offer
in them, as Autobahn's fuzzing server does.
"""

from __future__ import annotations

from collections.abc import Sequence

from fuzzserver import (
    FAILED,
    INVALID_PAYLOAD,
    NON_STRICT,
    NORMAL,
    OK,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PROTOCOL_ERROR,
    Case,
    Close,
    CloseAfter,
    EchoCheck,
    Event,
    Frame,
    KillAfter,
    Message,
    Raw,
    Record,
    Roundtrip,
    Step,
    Wait,
    frame_header,
)

__all__ = ["ALL_CASES", "CASES_BY_ID", "FAIL_FAST_CASES", "OK", "NON_STRICT", "FAILED"]

KiB = 1 << 10
MiB = 1 << 20


def _case(
    case_id: str,
    description: str,
    expectation: str,
    steps: Sequence[Step],
    expected: dict[str, list[Event]],
    closed_by_me: bool,
    close_codes: Sequence[int],
    require_clean: bool,
    **kwargs: object,
) -> Case:
    return Case(
        id=case_id,
        description=description,
        expectation=expectation,
        steps=tuple(steps),
        expected=expected,
        closed_by_me=closed_by_me,
        close_codes=tuple(close_codes),
        require_clean=require_clean,
        **kwargs,  # type: ignore[arg-type]
    )


def _echo_case(case_id: str, description: str, expectation: str, steps: Sequence[Step],
               events: list[Event], **kwargs: object) -> Case:
    """The testee must produce ``events``; the fuzzer then closes with 1000, cleanly."""
    return _case(case_id, description, expectation, steps, {OK: events}, True, [NORMAL], True,
                 **kwargs)


def _fail_case(case_id: str, description: str, expectation: str, steps: Sequence[Step],
               ok: list[Event] | None = None, non_strict: list[Event] | None = None,
               code: int = PROTOCOL_ERROR, **kwargs: object) -> Case:
    """The testee must fail the connection (close frame with ``code``, or a TCP drop)."""
    expected: dict[str, list[Event]] = {OK: ok or []}
    if non_strict is not None:
        expected[NON_STRICT] = non_strict
    return _case(case_id, description, expectation, steps, expected, False, [code], False,
                 **kwargs)


def _msg(payload: bytes, binary: bool = False) -> Event:
    return ("message", payload, binary)


CASES: list[Case] = []
add = CASES.append

# ======================================================================================
# 1 Framing

_ECHO_CLEAN = "Clean close with normal code."
for _i, _n in enumerate([0, 125, 126, 127, 128, 65535, 65536], 1):
    for _sub, _op, _byte, _kind in ((1, OP_TEXT, b"*", "text"), (2, OP_BINARY, b"\xfe", "binary")):
        _p = _byte * _n
        add(_echo_case(
            f"1.{_sub}.{_i}",
            f"Send {_kind} message with payload of length {_n}.",
            f"Receive echo'ed {_kind} message (with payload as sent). {_ECHO_CLEAN}",
            [Frame(_op, _p), KillAfter(1 if _n < 65535 else 2)],
            [_msg(_p, _op == OP_BINARY)],
        ))
for _sub, _op, _byte, _kind in ((1, OP_TEXT, b"*", "text"), (2, OP_BINARY, b"\xfe", "binary")):
    _p = _byte * 65536
    add(_echo_case(
        f"1.{_sub}.8",
        f"Send {_kind} message with payload of length 65536. Sent out data in chops of 997 "
        "octets.",
        f"Receive echo'ed {_kind} message (with payload as sent). {_ECHO_CLEAN}",
        [Frame(_op, _p, chopsize=997), KillAfter(10)],
        [_msg(_p, _op == OP_BINARY)],
    ))

# ======================================================================================
# 2 Pings/Pongs

_PONG = "Pong (with payload echo'ed) is sent in reply to Ping. Clean close with normal code."
add(_echo_case("2.1", "Send ping without payload.", _PONG,
               [Frame(OP_PING), CloseAfter(1)], [("pong", b"")]))
add(_echo_case("2.2", "Send ping with small text payload.", _PONG,
               [Frame(OP_PING, b"Hello, world!"), CloseAfter(1)], [("pong", b"Hello, world!")]))
_B8 = b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"
add(_echo_case("2.3", "Send ping with small binary (non UTF-8) payload.", _PONG,
               [Frame(OP_PING, _B8), CloseAfter(1)], [("pong", _B8)]))
add(_echo_case("2.4", "Send ping with binary payload of 125 octets.", _PONG,
               [Frame(OP_PING, b"\xfe" * 125), CloseAfter(1)], [("pong", b"\xfe" * 125)]))
add(_fail_case("2.5", "Send ping with binary payload of 126 octets.",
               "Connection is failed immediately (1002/Protocol Error), since control frames "
               "are only allowed to have payload up to and including 125 octets.",
               [Frame(OP_PING, b"\xfe" * 126), KillAfter(1)]))
add(_echo_case("2.6", "Send ping with binary payload of 125 octets, send in octet-wise chops.",
               _PONG + " Implementations must be TCP clean.",
               [Frame(OP_PING, b"\xfe" * 125, chopsize=1), CloseAfter(2)],
               [("pong", b"\xfe" * 125)]))
add(_echo_case("2.7", "Send unsolicited pong without payload. Verify nothing is received. "
               "Clean close with normal code.", "Nothing.",
               [Frame(OP_PONG), Close(NORMAL), CloseAfter(1)], []))
add(_echo_case("2.8", "Send unsolicited pong with payload. Verify nothing is received. "
               "Clean close with normal code.", "Nothing.",
               [Frame(OP_PONG, b"unsolicited pong payload"), Close(NORMAL), CloseAfter(1)], []))
add(_echo_case("2.9", "Send unsolicited pong with payload. Send ping with payload. Verify pong "
               "for ping is received.",
               "Nothing in reply to own Pong, but Pong with payload echo'ed in reply to Ping. "
               "Clean close with normal code.",
               [Frame(OP_PONG, b"unsolicited pong payload"), Frame(OP_PING, b"ping payload"),
                CloseAfter(1)],
               [("pong", b"ping payload")]))
for _cid, _chop, _extra in (("2.10", None, ""), ("2.11", 1, " Send out octets in octet-wise "
                                                              "chops.")):
    _pl = [b"payload-%d" % _k for _k in range(10)]
    add(_echo_case(
        _cid, "Send 10 Pings with payload." + _extra,
        "Pongs for our Pings with all the payloads. Note: This is not required by the Spec .. "
        "but we check for this behaviour anyway. Clean close with normal code.",
        [Frame(OP_PING, p, chopsize=_chop) for p in _pl] + [CloseAfter(3)],
        [("pong", p) for p in _pl],
    ))

# ======================================================================================
# 3 Reserved Bits

_HW = b"Hello, world!"
_RSV_FAIL = ("The connection is failed immediately, since RSV must be 0, when no extension "
             "defining RSV meaning has been negotiated.")
_RSV_FAIL_FAST = ("Echo for first message is received, but then connection is failed "
                  "immediately, since RSV must be 0, when no extension defining RSV meaning "
                  "has been negotiated. The Pong is not received.")
add(_fail_case("3.1", "Send small text message with RSV = 1.", _RSV_FAIL,
               [Frame(OP_TEXT, _HW, rsv=1), KillAfter(1)]))
add(_fail_case("3.2", "Send small text message, then send again with RSV = 2, then send Ping.",
               _RSV_FAIL_FAST,
               [Frame(OP_TEXT, _HW), Frame(OP_TEXT, _HW, rsv=2), Frame(OP_PING), KillAfter(1)],
               ok=[_msg(_HW)], non_strict=[]))
add(_fail_case("3.3", "Send small text message, then send again with RSV = 3, then send Ping. "
               "Octets are sent in frame-wise chops.", _RSV_FAIL_FAST,
               [Frame(OP_TEXT, _HW, sync=True), Frame(OP_TEXT, _HW, rsv=3, sync=True),
                Frame(OP_PING, sync=True), KillAfter(1)],
               ok=[_msg(_HW)], non_strict=[]))
add(_fail_case("3.4", "Send small text message, then send again with RSV = 4, then send Ping. "
               "Octets are sent in octet-wise chops.", _RSV_FAIL_FAST,
               [Frame(OP_TEXT, _HW, chopsize=1), Frame(OP_TEXT, _HW, rsv=4, chopsize=1),
                Frame(OP_PING, chopsize=1), KillAfter(1)],
               ok=[_msg(_HW)], non_strict=[]))
add(_fail_case("3.5", "Send small binary message with RSV = 5.",
               "The connection is failed immediately, since RSV must be 0.",
               [Frame(OP_BINARY, _B8, rsv=5), KillAfter(1)]))
# Autobahn's case3_6.py describes a Ping but sends opcode 2 (binary) with RSV = 6.
add(_fail_case("3.6", "Send Ping with RSV = 6 (Autobahn actually sends a binary frame).",
               "The connection is failed immediately, since RSV must be 0.",
               [Frame(OP_BINARY, _HW, rsv=6), KillAfter(1)]))
add(_fail_case("3.7", "Send Close with RSV = 7.",
               "The connection is failed immediately, since RSV must be 0.",
               [Frame(OP_CLOSE, rsv=7), KillAfter(1)]))

# ======================================================================================
# 4 Opcodes

_RESERVED = b"reserved opcode payload"
_OP_FAIL = "The connection is failed immediately."
_OP_FAIL_FAST = ("Echo for first message is received, but then connection is failed "
                 "immediately, since reserved opcode frame is used. A Pong is not received.")
for _sub, _kind, _ops in (("1", "non-control", (3, 4, 5, 6, 7)),
                          ("2", "control", (11, 12, 13, 14, 15))):
    add(_fail_case(f"4.{_sub}.1", f"Send frame with reserved {_kind} Opcode = {_ops[0]}.",
                   _OP_FAIL, [Frame(_ops[0]), KillAfter(1)]))
    add(_fail_case(f"4.{_sub}.2", f"Send frame with reserved {_kind} Opcode = {_ops[1]} and "
                   "non-empty payload.", _OP_FAIL,
                   [Frame(_ops[1], _RESERVED), KillAfter(1)]))
    add(_fail_case(f"4.{_sub}.3", f"Send small text message, then send frame with reserved "
                   f"{_kind} Opcode = {_ops[2]}, then send Ping.", _OP_FAIL_FAST,
                   [Frame(OP_TEXT, _HW), Frame(_ops[2]), Frame(OP_PING), KillAfter(1)],
                   ok=[_msg(_HW)], non_strict=[]))
    add(_fail_case(f"4.{_sub}.4", f"Send small text message, then send frame with reserved "
                   f"{_kind} Opcode = {_ops[3]} and non-empty payload, then send Ping.",
                   _OP_FAIL_FAST,
                   [Frame(OP_TEXT, _HW), Frame(_ops[3], _HW), Frame(OP_PING), KillAfter(1)],
                   ok=[_msg(_HW)], non_strict=[]))
    add(_fail_case(f"4.{_sub}.5", f"Send small text message, then send frame with reserved "
                   f"{_kind} Opcode = {_ops[4]} and non-empty payload, then send Ping. "
                   "Octets are sent in octet-wise chops.", _OP_FAIL_FAST,
                   [Frame(OP_TEXT, _HW, chopsize=1), Frame(_ops[4], _HW, chopsize=1),
                    Frame(OP_PING, chopsize=1), KillAfter(1)],
                   ok=[_msg(_HW)], non_strict=[]))

# ======================================================================================
# 5 Fragmentation

_F = [b"fragment1", b"fragment2", b"fragment3", b"fragment4", b"fragment5"]
_NOTHING = "The connection is failed immediately, since there is no message to continue."
add(_fail_case("5.1", "Send Ping fragmented into 2 fragments.",
               "Connection is failed immediately, since control message MUST NOT be fragmented.",
               [Frame(OP_PING, _F[0], fin=False), Frame(OP_CONT, _F[1]), KillAfter(1)]))
add(_fail_case("5.2", "Send Pong fragmented into 2 fragments.",
               "Connection is failed immediately, since control message MUST NOT be fragmented.",
               [Frame(OP_PONG, _F[0], fin=False), Frame(OP_CONT, _F[1]), KillAfter(1)]))
for _cid, _how, _kw in (("5.3", "", {}),
                        ("5.4", ", octets are sent in frame-wise chops", {"sync": True}),
                        ("5.5", ", octets are sent in octet-wise chops", {"chopsize": 1})):
    add(_echo_case(_cid, f"Send text Message fragmented into 2 fragments{_how}.",
                   "Message is processed and echo'ed back to us.",
                   [Frame(OP_TEXT, _F[0], fin=False, **_kw),  # type: ignore[arg-type]
                    Frame(OP_CONT, _F[1], **_kw), CloseAfter(1)],  # type: ignore[arg-type]
                   [_msg(_F[0] + _F[1])]))
for _cid, _how, _kw in (("5.6", "", {}),
                        ("5.7", " Octets are sent in frame-wise chops.", {"sync": True}),
                        ("5.8", " Octets are sent in octet-wise chops.", {"chopsize": 1})):
    add(_echo_case(_cid, "Send text Message fragmented into 2 fragments, one ping with payload "
                   f"in-between.{_how}", "A pong is received, then the message is echo'ed back "
                   "to us.",
                   [Frame(OP_TEXT, _F[0], fin=False, **_kw),  # type: ignore[arg-type]
                    Frame(OP_PING, b"ping payload", **_kw),  # type: ignore[arg-type]
                    Frame(OP_CONT, _F[1], **_kw), CloseAfter(1)],  # type: ignore[arg-type]
                   [("pong", b"ping payload"), _msg(_F[0] + _F[1])]))
for _fin, _ids in ((True, ("5.9", "5.10", "5.11")), (False, ("5.12", "5.13", "5.14"))):
    for _cid, _how, _kw in zip(_ids, ("one chop", "per-frame chops", "octet-wise chops"),
                               ({}, {"sync": True}, {"chopsize": 1})):
        add(_fail_case(
            _cid, "Send unfragmented Text Message after Continuation Frame with FIN = "
            f"{str(_fin).lower()}, where there is nothing to continue, sent in {_how}.",
            _NOTHING,
            [Frame(OP_CONT, b"non-continuation payload", fin=_fin, **_kw),  # type: ignore[arg-type]
             Frame(OP_TEXT, _HW, **_kw), KillAfter(1)],  # type: ignore[arg-type]
        ))
add(_fail_case("5.15", "Send text Message fragmented into 2 fragments, then Continuation Frame "
               "with FIN = false where there is nothing to continue, then unfragmented Text "
               "Message, all sent in one chop.", _NOTHING,
               [Frame(OP_TEXT, _F[0], fin=False), Frame(OP_CONT, _F[1]),
                Frame(OP_CONT, _F[2], fin=False), Frame(OP_TEXT, _F[3]), KillAfter(1)],
               ok=[_msg(_F[0] + _F[1])], non_strict=[]))
for _cid, _fin in (("5.16", False), ("5.17", True)):
    add(_fail_case(_cid, f"Repeated 2x: Continuation Frame with FIN = {str(_fin).lower()} "
                   "(where there is nothing to continue), then text Message fragmented into 2 "
                   "fragments.", _NOTHING,
                   [Frame(OP_CONT, _F[0], fin=_fin), Frame(OP_TEXT, _F[1], fin=False),
                    Frame(OP_CONT, _F[2])] * 2 + [KillAfter(1)]))
add(_fail_case("5.18", "Send text Message fragmented into 2 fragments, with both frame opcodes "
               "set to text, sent in one chop.", "The connection is failed immediately, since "
               "all data frames after the initial data frame must have opcode 0.",
               [Frame(OP_TEXT, _F[0], fin=False), Frame(OP_TEXT, _F[1]), KillAfter(1)]))

_PINGS = [b"pongme 1!", b"pongme 2!"]


def _first_pong_before_pause(rec: Record) -> str | None:
    """5.19 / 5.20: the first Ping must be answered during the 1 s pause, i.e. before the
    message is complete (Autobahn's expectation text; its check is only the event order)."""
    for ev, t in zip(rec.received, rec.received_at):
        if ev == ("pong", _PINGS[0]):
            return None if t < 1.0 else f"first Pong only after {t:.3f}s (the pause is 1 s)"
    return None  # missing pong: the event comparison already fails the case


for _cid, _sync in (("5.19", False), ("5.20", True)):
    add(_echo_case(
        _cid,
        "A fragmented text message is sent in multiple frames. After sending the first 2 frames "
        "of the text message, a Ping is sent. Then we wait 1s, then we send 2 more text "
        "fragments, another Ping and then the final text fragment. Everything is legal."
        + (" All frames are sent with SYNC = True." if _sync else ""),
        "The peer immediately answers the first Ping before it has received the last text "
        "message fragment. The peer pong's back the Ping's payload exactly, and echo's the "
        "payload of the fragmented message back to us.",
        [Frame(OP_TEXT, _F[0], fin=False, sync=_sync),
         Frame(OP_CONT, _F[1], fin=False, sync=_sync),
         Frame(OP_PING, _PINGS[0], sync=_sync),
         Wait(1, require_open=False),
         Frame(OP_CONT, _F[2], fin=False, sync=_sync),
         Frame(OP_CONT, _F[3], fin=False, sync=_sync),
         Frame(OP_PING, _PINGS[1], sync=_sync),
         Frame(OP_CONT, _F[4], sync=_sync),
         CloseAfter(1)],
        [("pong", _PINGS[0]), ("pong", _PINGS[1]), _msg(b"".join(_F))],
        check=_first_pong_before_pause,
    ))

# ======================================================================================
# 6 UTF-8 Handling

_ECHOED = "The message is echo'ed back to us."
_UTF8_FAIL = "The connection is failed immediately, since the payload is not valid UTF-8."
add(_echo_case("6.1.1", "Send text message of length 0.",
               "A message is echo'ed back to us (with empty payload).",
               [Frame(OP_TEXT, b""), CloseAfter(1)], [_msg(b"")]))
add(_echo_case("6.1.2", "Send fragmented text message, 3 fragments each of length 0.",
               "A message is echo'ed back to us (with empty payload).",
               [Frame(OP_TEXT, b"", fin=False), Frame(OP_CONT, b"", fin=False),
                Frame(OP_CONT, b""), CloseAfter(1)], [_msg(b"")]))
add(_echo_case("6.1.3", "Send fragmented text message, 3 fragments, first and last of length 0, "
               "middle non-empty.",
               "A message is echo'ed back to us (with payload = payload of middle fragment).",
               [Frame(OP_TEXT, b"", fin=False), Frame(OP_CONT, b"middle frame payload",
                                                       fin=False),
                Frame(OP_CONT, b""), CloseAfter(1)], [_msg(b"middle frame payload")]))

_HELLO_UTF8 = "Hello-µ@ßöäüàá-UTF-8!!".encode()
_KOSME = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"  # κόσμε
add(_echo_case("6.2.1", "Send a valid UTF-8 text message in one fragment.", _ECHOED,
               [Message(_HELLO_UTF8), CloseAfter(1)], [_msg(_HELLO_UTF8)]))
_H1, _H2 = "Hello-µ@ßöä".encode(), "üàá-UTF-8!!".encode()
add(_echo_case("6.2.2", "Send a valid UTF-8 text message in two fragments, fragmented on UTF-8 "
               "code point boundary.", _ECHOED,
               [Frame(OP_TEXT, _H1, fin=False), Frame(OP_CONT, _H2), CloseAfter(1)],
               [_msg(_H1 + _H2)]))
add(_echo_case("6.2.3", "Send a valid UTF-8 text message in fragments of 1 octet, resulting in "
               "frames ending on positions which are not code point ends.", _ECHOED,
               [Message(_HELLO_UTF8, fragment_size=1), CloseAfter(1)], [_msg(_HELLO_UTF8)]))
add(_echo_case("6.2.4", "Send a valid UTF-8 text message in fragments of 1 octet, resulting in "
               "frames ending on positions which are not code point ends.", _ECHOED,
               [Message(_KOSME, fragment_size=1), CloseAfter(1)], [_msg(_KOSME)]))

_INVALID_631 = _KOSME + b"\xed\xa0\x80" + b"edited"  # invalid exactly at octet 12 (\xa0)
add(_fail_case("6.3.1", "Send invalid UTF-8 text message unfragmented.", _UTF8_FAIL,
               [Message(_INVALID_631), KillAfter(1)], code=INVALID_PAYLOAD,
               closed_by_wrong_endpoint_is_fatal=True))
add(_fail_case("6.3.2", "Send invalid UTF-8 text message in fragments of 1 octet, resulting in "
               "frames ending on positions which are not code point ends.", _UTF8_FAIL,
               [Message(_INVALID_631, fragment_size=1), KillAfter(1)], code=INVALID_PAYLOAD,
               closed_by_wrong_endpoint_is_fatal=True))

# 6.4: fail fast. PART2 makes the payload invalid: 0xF4 0x90 0x80 0x80 would be U+110000.
_P1, _P2, _P3 = _KOSME, b"\xf4\x90\x80\x80", b"edited"
_P = _P1 + _P2 + _P3
_FAST_EXPECT = ("The first {0} is accepted, we expect to timeout on the first wait. The 2nd "
                "{0} should be rejected immediately (fail fast on UTF-8). If we timeout, we "
                "expect the connection is failed at least then, since the complete message "
                "payload is not valid UTF-8.")
_FAST = {"ok": [("timeout", "A")], "non_strict": [("timeout", "A"), ("timeout", "B")],
         "code": INVALID_PAYLOAD, "closed_by_wrong_endpoint_is_fatal": True}
add(_fail_case("6.4.1", "Send invalid UTF-8 text message in 3 fragments (frames). First frame "
               "payload is valid, then wait, then 2nd frame which contains the payload making "
               "the sequence invalid, then wait, then 3rd frame with rest. PART2 is 0x110000 "
               "encoded as in the UTF-8 integer encoding scheme (out of range).",
               _FAST_EXPECT.format("frame"),
               [Frame(OP_TEXT, _P1, fin=False), Wait(1, "A"), Frame(OP_CONT, _P2, fin=False),
                Wait(1, "B"), Frame(OP_CONT, _P3), KillAfter(1)],
               **_FAST))  # type: ignore[arg-type]
add(_fail_case("6.4.2", "Same as Case 6.4.1, but in 2nd frame, we send only up to and including "
               "the octet making the complete payload invalid.",
               _FAST_EXPECT.format("frame"),
               [Frame(OP_TEXT, _P[:12], fin=False), Wait(1, "A"),
                Frame(OP_CONT, _P[12:13], fin=False), Wait(1, "B"), Frame(OP_CONT, _P[13:]),
                KillAfter(1)],
               **_FAST))  # type: ignore[arg-type]
_HDR = frame_header(OP_TEXT, len(_P))  # one frame, its payload sent in 3 chops
add(_fail_case("6.4.3", "Same as Case 6.4.1, but we send message not in 3 frames, but in 3 chops "
               "of the same message frame.", _FAST_EXPECT.format("chop"),
               [Raw(_HDR + _P1), Wait(1, "A"), Raw(_P2), Wait(1, "B"), Raw(_P3), KillAfter(1)],
               **_FAST))  # type: ignore[arg-type]
add(_fail_case("6.4.4", "Same as Case 6.4.2, but we send message not in 3 frames, but in 3 chops "
               "of the same message frame.", _FAST_EXPECT.format("chop"),
               [Raw(_HDR + _P[:12]), Wait(1, "A"), Raw(_P[12:13]), Wait(1, "B"), Raw(_P[13:]),
                KillAfter(1)],
               **_FAST))  # type: ignore[arg-type]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")  # strict: no surrogates, nothing above U+10FFFF, no overlongs
        return True
    except UnicodeDecodeError:
        return False


def utf8_test_sequences() -> list[tuple[str, list[tuple[bool, bytes]]]]:
    """Autobahn's ``createUtf8TestSequences`` (from Markus Kuhn's UTF-8 decoder stress test):
    subcategories 6.5 ... 6.23, each a list of (valid, payload)."""
    seqs: list[tuple[str, list[tuple[bool, bytes]]]] = []
    seqs.append(("Some valid UTF-8 sequences", [
        (True, b"hello\x24world"), (True, b"hello\xc2\xa2world"),
        (True, b"hello\xe2\x82\xacworld"), (True, b"hello\xf0\xa4\xad\xa2world"),
        (True, _KOSME)]))
    seqs.append(("All prefixes of a valid UTF-8 string that contains multi-byte code points",
                 [(_is_utf8(_KOSME[:i]), _KOSME[:i]) for i in range(1, len(_KOSME) + 1)]))
    seqs.append(("First possible sequence of a certain length", [
        (True, b"\x00"), (True, b"\xc2\x80"), (True, b"\xe0\xa0\x80"),
        (True, b"\xf0\x90\x80\x80")]))
    seqs.append(("First possible sequence length 5/6 (invalid codepoints)", [
        (False, b"\xf8\x88\x80\x80\x80"), (False, b"\xfc\x84\x80\x80\x80\x80")]))
    seqs.append(("Last possible sequence of a certain length", [
        (True, b"\x7f"), (True, b"\xdf\xbf"), (True, b"\xef\xbf\xbf"),
        (True, b"\xf4\x8f\xbf\xbf")]))
    seqs.append(("Last possible sequence length 4/5/6 (invalid codepoints)", [
        (False, b"\xf7\xbf\xbf\xbf"), (False, b"\xfb\xbf\xbf\xbf\xbf"),
        (False, b"\xfd\xbf\xbf\xbf\xbf\xbf")]))
    seqs.append(("Other boundary conditions", [
        (True, b"\xed\x9f\xbf"), (True, b"\xee\x80\x80"), (True, b"\xef\xbf\xbd"),
        (True, b"\xf4\x8f\xbf\xbf"), (False, b"\xf4\x90\x80\x80")]))
    seqs.append(("Unexpected continuation bytes", [
        (False, b"\x80"), (False, b"\xbf"), (False, b"\x80\xbf"), (False, b"\x80\xbf\x80"),
        (False, b"\x80\xbf\x80\xbf"), (False, b"\x80\xbf\x80\xbf\x80"),
        (False, b"\x80\xbf\x80\xbf\x80\xbf"),
        (False, bytes(range(0x80, 0xbf)))]))  # xrange(0x80, 0xbf): 0xbf excluded
    lonely = []
    for lo, hi in ((0xc0, 0xdf), (0xe0, 0xef), (0xf0, 0xf7), (0xf8, 0xfb), (0xfc, 0xfd)):
        lonely.append((False, b"".join(bytes([c, 0x20]) for c in range(lo, hi))))
    seqs.append(("Lonely start characters", lonely))
    missing = [b"\xc0", b"\xe0\x80", b"\xf0\x80\x80", b"\xf8\x80\x80\x80",
               b"\xfc\x80\x80\x80\x80", b"\xdf", b"\xef\xbf", b"\xf7\xbf\xbf",
               b"\xfb\xbf\xbf\xbf", b"\xfd\xbf\xbf\xbf\xbf"]
    seqs.append(("Sequences with last continuation byte missing", [(False, k) for k in missing]))
    seqs.append(("Concatenation of incomplete sequences", [(False, b"".join(missing))]))
    seqs.append(("Impossible bytes", [(False, b"\xfe"), (False, b"\xff"),
                                      (False, b"\xfe\xfe\xff\xff")]))
    seqs.append(("Examples of an overlong ASCII character", [
        (False, b"\xc0\xaf"), (False, b"\xe0\x80\xaf"), (False, b"\xf0\x80\x80\xaf"),
        (False, b"\xf8\x80\x80\x80\xaf"), (False, b"\xfc\x80\x80\x80\x80\xaf")]))
    seqs.append(("Maximum overlong sequences", [
        (False, b"\xc1\xbf"), (False, b"\xe0\x9f\xbf"), (False, b"\xf0\x8f\xbf\xbf"),
        (False, b"\xf8\x87\xbf\xbf\xbf"), (False, b"\xfc\x83\xbf\xbf\xbf\xbf")]))
    seqs.append(("Overlong representation of the NUL character", [
        (False, b"\xc0\x80"), (False, b"\xe0\x80\x80"), (False, b"\xf0\x80\x80\x80"),
        (False, b"\xf8\x80\x80\x80\x80"), (False, b"\xfc\x80\x80\x80\x80\x80")]))
    seqs.append(("Single UTF-16 surrogates", [
        (False, b"\xed\xa0\x80"), (False, b"\xed\xad\xbf"), (False, b"\xed\xae\x80"),
        (False, b"\xed\xaf\xbf"), (False, b"\xed\xb0\x80"), (False, b"\xed\xbe\x80"),
        (False, b"\xed\xbf\xbf")]))
    seqs.append(("Paired UTF-16 surrogates", [
        (False, b"\xed\xa0\x80\xed\xb0\x80"), (False, b"\xed\xa0\x80\xed\xbf\xbf"),
        (False, b"\xed\xad\xbf\xed\xb0\x80"), (False, b"\xed\xad\xbf\xed\xbf\xbf"),
        (False, b"\xed\xae\x80\xed\xb0\x80"), (False, b"\xed\xae\x80\xed\xbf\xbf"),
        (False, b"\xed\xaf\xbf\xed\xb0\x80"), (False, b"\xed\xaf\xbf\xed\xbf\xbf")]))
    nonchars = [(True, b"\xef\xbf\xbe"), (True, b"\xef\xbf\xbf")]
    for z1 in (0xf0, 0xf1, 0xf2, 0xf3, 0xf4):
        for z2 in (0x8f, 0x9f, 0xaf, 0xbf):
            if z1 == 0xf4 and z2 != 0x8f:  # above U+10FFFF
                continue
            for z3 in (0xbe, 0xbf):
                zz = bytes([z1, z2, 0xbf, z3])
                if zz not in (b"\xf0\x8f\xbf\xbe", b"\xf0\x8f\xbf\xbf"):  # overlong
                    nonchars.append((True, zz))
    seqs.append(("Non-character code points (valid UTF-8)", nonchars))
    seqs.append(("Unicode specials (i.e. replacement char)", [
        (True, b"\xef\xbf\xb9"), (True, b"\xef\xbf\xba"), (True, b"\xef\xbf\xbb"),
        (True, b"\xef\xbf\xbc"), (True, b"\xef\xbf\xbd"), (True, b"\xef\xbf\xbe"),
        (True, b"\xef\xbf\xbf")]))
    for _name, items in seqs:  # our validity flags must agree with Python's strict decoder
        for valid, payload in items:
            assert valid == _is_utf8(payload), payload
    return seqs


for _i, (_name, _items) in enumerate(utf8_test_sequences(), 5):
    for _j, (_valid, _payload) in enumerate(_items, 1):
        _cid = f"6.{_i}.{_j}"
        if _valid:
            add(_echo_case(_cid, f"{_name}: send a text message with payload which is valid "
                           f"UTF-8 in one fragment. Payload: 0x{_payload.hex()}", _ECHOED,
                           [Message(_payload), KillAfter(0.5)], [_msg(_payload)]))
        else:
            add(_fail_case(_cid, f"{_name}: send a text message with payload which is not valid "
                           f"UTF-8 in one fragment. Payload: 0x{_payload.hex()}", _UTF8_FAIL,
                           [Message(_payload), KillAfter(0.5)], code=INVALID_PAYLOAD,
                           closed_by_wrong_endpoint_is_fatal=True))

# ======================================================================================
# 7 Close Handling (fuzzer initiated). Autobahn's 7.x onConnectionLost turns a wrong close
# code into a failure of the case (wrong_code_is_fatal).

_C7 = {"wrong_code_is_fatal": True}
_CLEAN_NORMAL = "Clean close with normal code."
add(_echo_case("7.1.1", "Send a message followed by a close frame.",
               "Echoed message followed by clean close with normal code.",
               [Frame(OP_TEXT, b"Hello World!"), KillAfter(1)], [_msg(b"Hello World!")], **_C7))
add(_echo_case("7.1.2", "Send two close frames.",
               "Clean close with normal code. Second close frame ignored.",
               [Close(NORMAL), Frame(OP_CLOSE), KillAfter(1)], [], suppress_close=True, **_C7))
add(_echo_case("7.1.3", "Send a ping after close message.",
               "Clean close with normal code, no pong.",
               [Close(NORMAL), Frame(OP_PING), KillAfter(1)], [], suppress_close=True, **_C7))
add(_echo_case("7.1.4", "Send text message after sending a close frame.",
               "Clean close with normal code. Text message ignored.",
               [Close(NORMAL), Frame(OP_TEXT, b"Hello World!"), KillAfter(1)], [],
               suppress_close=True, **_C7))
add(_echo_case("7.1.5", "Send message fragment1 followed by close then fragment.",
               _CLEAN_NORMAL,
               [Frame(OP_TEXT, _F[0], fin=False), Close(NORMAL), Frame(OP_CONT, _F[1]),
                KillAfter(1)], [], suppress_close=True, **_C7))
add(_case("7.1.6", "Send 256K message followed by close then a ping.",
          "Case outcome depends on implementation defined close behavior. Message and close "
          "frame are sent back to back. If the close frame is processed before the text message "
          "write is complete (as can happen in asynchronous processing models) the close frame "
          "is processed first and the text message may not be received or may only be "
          "partially received.",
          [Frame(OP_TEXT, b"BAsd7&jh23", payload_len=256 * KiB),
           Frame(OP_TEXT, b"Hello World!"), Close(NORMAL), Frame(OP_PING), KillAfter(1)],
          {OK: [_msg(b"Hello World!")], NON_STRICT: []}, True, [NORMAL], True,
          suppress_close=True, informational=True))

add(_echo_case("7.3.1", "Send a close frame with payload length 0 (no close code, no close "
               "reason).", _CLEAN_NORMAL, [Close(), KillAfter(1)], [], suppress_close=True,
               **_C7))
add(_case("7.3.2", "Send a close frame with payload length 1.",
          "Clean close with protocol error or drop TCP.",
          [Close(None, b"a"), KillAfter(1)], {OK: []}, True, [PROTOCOL_ERROR], False,
          suppress_close=True, **_C7))
add(_echo_case("7.3.3", "Send a close frame with payload length 2 (regular close with a code).",
               _CLEAN_NORMAL, [Close(NORMAL), KillAfter(1)], [], suppress_close=True, **_C7))
add(_echo_case("7.3.4", "Send a close frame with close code and close reason.", _CLEAN_NORMAL,
               [Close(NORMAL, b"Hello World!"), KillAfter(1)], [], suppress_close=True, **_C7))
add(_echo_case("7.3.5", "Send a close frame with close code and close reason of maximum length "
               "(123).", _CLEAN_NORMAL, [Close(NORMAL, b"*" * 123), KillAfter(1)], [],
               suppress_close=True, **_C7))
add(_case("7.3.6", "Send a close frame with close code and close reason which is too long (124) "
          "- total frame payload 126 octets.",
          "Clean close with protocol error code or dropped TCP connection.",
          [Close(NORMAL, b"*" * 124), KillAfter(1)], {OK: []}, True, [PROTOCOL_ERROR], False,
          suppress_close=True, **_C7))
add(_case("7.5.1", "Send a close frame with invalid UTF8 payload.",
          "Clean close with protocol error or invalid utf8 code or dropped TCP.",
          [Close(NORMAL, _INVALID_631), KillAfter(1)], {OK: []}, True,
          [PROTOCOL_ERROR, INVALID_PAYLOAD], False, suppress_close=True, **_C7))
for _j, _code in enumerate([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999,
                            4000, 4999], 1):
    add(_case(f"7.7.{_j}", f"Send close with valid close code {_code}.",
              "Clean close with normal or echoed code.",
              [Close(_code), KillAfter(1)], {OK: []}, True, [NORMAL, _code], True,
              suppress_close=True, **_C7))
for _j, _code in enumerate([0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999], 1):
    add(_case(f"7.9.{_j}", f"Send close with invalid close code {_code}.",
              "Clean close with protocol error code or drop TCP.",
              [Close(_code), KillAfter(1)], {OK: []}, True, [PROTOCOL_ERROR], False,
              suppress_close=True, **_C7))
for _j, _code in enumerate([5000, 65535], 1):
    add(_case(f"7.13.{_j}", f"Send close with close code {_code}.",
              "Actual events are undefined by the spec.",
              [Close(_code), KillAfter(1)], {OK: []}, True, [NORMAL, _code, PROTOCOL_ERROR],
              False, suppress_close=True, informational=True))

# ======================================================================================
# 9 Limits/Performance. The fuzzer sends one message (or 1000 small ones one after the
# other), waits for the echo, then closes with 1000.

_TXT_PATTERN = b"BAsd7&jh23"
_BIN_PATTERN = b"\x00\xfe\x23\xfa\xf0"


def _perf(case_id: str, description: str, steps: Sequence[Step], binary: bool, length: int,
          pattern: bytes, time_limit: float, scaled: str = "") -> Case:
    kind = "binary" if binary else "text"
    return _case(case_id, description, f"Receive echo'ed {kind} message (with payload as sent).",
                 steps, {}, True, [NORMAL], True,
                 echo=EchoCheck(binary, length, pattern), time_limit=time_limit, scaled=scaled)


def _size(n: int) -> str:
    return f"{n // MiB}M" if n >= MiB and n % MiB == 0 else f"{n // KiB}k" if n >= KiB else str(n)


# 9.1 / 9.2: one unfragmented message of increasing size (full sizes: 64k ... 16M)
for _sub, _binary, _pat in ((1, False, _TXT_PATTERN), (2, True, _BIN_PATTERN)):
    _kind = "binary" if _binary else "text"
    for _j, _n in enumerate([64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 8 * MiB, 16 * MiB], 1):
        add(_perf(f"9.{_sub}.{_j}", f"Send {_kind} message message with payload of length "
                  f"{_size(_n)}.",
                  [Message(_pat, binary=_binary, payload_len=_n), CloseAfter(100)],
                  _binary, _n, _pat, time_limit=60.0))

# 9.3 / 9.4: one 4M message in fragments of 64 ... 4M (9.3.1: 65536 frames of 64 octets)
for _sub, _binary, _pat in ((3, False, b"*"), (4, True, b"\xfe")):
    _kind = "binary" if _binary else "text"
    for _j, _frag in enumerate([64, 256, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB,
                                4 * MiB], 1):
        add(_perf(f"9.{_sub}.{_j}", f"Send fragmented {_kind} message message with message "
                  f"payload of length 4M. Sent out in fragments of {_size(_frag)}.",
                  [Message(_pat, binary=_binary, payload_len=4 * MiB, fragment_size=_frag),
                   CloseAfter(100)],
                  _binary, 4 * MiB, _pat, time_limit=60.0))

# 9.5 / 9.6: one 1M message written in chops of 64 ... 2048 octets (9.5.1: 16384 writes)
for _sub, _binary, _pat in ((5, False, _TXT_PATTERN), (6, True, _BIN_PATTERN)):
    _kind = "binary" if _binary else "text"
    for _j, _chop in enumerate([64, 128, 256, 512, 1024, 2048], 1):
        add(_perf(f"9.{_sub}.{_j}", f"Send {_kind} message message with payload of length 1M. "
                  f"Sent out data in chops of {_chop} octets.",
                  [Message(_pat, binary=_binary, payload_len=1 * MiB, chopsize=_chop),
                   CloseAfter(100)],
                  _binary, 1 * MiB, _pat, time_limit=60.0))

# 9.7 / 9.8: 1000 round trips of small messages (0 ... 4096 octets), one at a time
for _sub, _binary, _pat in ((7, False, b"*"), (8, True, b"\xfe")):
    _kind = "binary" if _binary else "text"
    for _j, _n in enumerate([0, 16, 64, 256, 1024, 4096], 1):
        _count = 1000
        add(_case(
            f"9.{_sub}.{_j}", f"Send {_count} {_kind} messages of payload size {_n} to measure "
            "implementation/network RTT (round trip time) / latency.",
            f"Receive echo'ed {_kind} messages (with payload as sent).",
            [Message(_pat, binary=_binary, payload_len=_n), CloseAfter(60)], {}, True, [NORMAL],
            True, roundtrip=Roundtrip(_count, _n, _binary, _pat), time_limit=60.0))

# ======================================================================================
# 10 Misc


def _check_10_1_1(rec: Record) -> str | None:
    want = {OP_TEXT: 1, OP_CONT: 65536 // 1300}
    got = {op: rec.tx_data_frames.get(op, 0) for op in want}
    return None if got == want else f"fuzzer sent frames {got}, expected {want}"


add(_echo_case("10.1.1", "Send text message with payload of length 65536 auto-fragmented with "
               "autoFragmentSize = 1300.",
               "Receive echo'ed text message (with payload as sent and transmitted frame counts "
               "as expected). Clean close with normal code.",
               [Message(b"*" * 65536, fragment_size=1300), KillAfter(10)],
               [_msg(b"*" * 65536)], check=_check_10_1_1))


def _key(case: Case) -> tuple[int, ...]:
    return tuple(int(x) for x in case.id.split("."))


ALL_CASES: list[Case] = sorted(CASES, key=_key)
CASES_BY_ID: dict[str, Case] = {c.id: c for c in ALL_CASES}
assert len(CASES_BY_ID) == len(ALL_CASES), "duplicate case ids"

#: The cases where a client has to fail the connection as soon as the bad octets arrive,
#: before it goes on with what follows (OK vs NON-STRICT in Autobahn).
FAIL_FAST_CASES = ["3.2", "3.3", "3.4", "4.1.3", "4.1.4", "4.1.5", "4.2.3", "4.2.4", "4.2.5",
                   "5.15", "6.4.1", "6.4.2", "6.4.3", "6.4.4"]
