"""Autobahn TestSuite client cases of categories 12 and 13 (permessage-deflate).

Each test plays one case of ``autobahn_deflate_cases`` (see its docstring for what the
cases do and how they were scaled down) with ``fuzzserver.FuzzServer`` against the testee,
an echo client with its default extensions (blockws offers ``permessage-deflate;
client_max_window_bits``), and asserts the verdict is OK. ``BLOCKWS_AUTOBAHN_TESTEE`` picks
another testee as in ``test_autobahn.py`` (``reference`` and ``websockets`` then offer
permessage-deflate too): the reference client is OK on all 216 cases; `websockets` (13.x,
17.x) is OK on 12.x, 13.1, 13.2, 13.4 and 13.6 and FAILED on 13.3, 13.5 and 13.7, because it
refuses a ``client_max_window_bits=8`` answer ("unsupported client_max_window_bits = 8, use
9"), which RFC 7692 allows and Autobahn sends.

The other tests need no testee: the negotiation table (what the fuzzer answers to which
offer, after Autobahn's ``accept1`` ... ``accept7`` and autobahn's offer parsing), the
deflate parser behind the window check, and the judge against deliberately lax variants
of the reference client (no offer: UNIMPLEMENTED; keeping the compression context against
``client_no_context_takeover``, or ignoring ``client_max_window_bits=8``: FAILED).

``python tests/test_autobahn.py 12 13`` prints a verdict table instead.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from autobahn_deflate_cases import (
    DEFLATE_CASES,
    DEFLATE_CASES_BY_ID,
    DEFLATE_POLICIES,
    MSG_SIZES,
    TESTDATA,
    load_testdata,
)
from fuzzserver import (
    DEFLATE_TAIL,
    FAILED,
    OK,
    UNIMPLEMENTED,
    Case,
    DeflateOffer,
    DeflateSession,
    deflate_max_distance,
    parse_extensions,
)
from test_autobahn import (
    TESTEE_ENV,
    TESTEES,
    ReferenceAdapter,
    TesteeAdapter,
    blockws_unavailable,
    make_testee,
    run_case,
    selected_testee,
)

BLOCKWS_OFFER = "permessage-deflate; client_max_window_bits"


def _params() -> list[Any]:
    params = []
    for case in DEFLATE_CASES:
        marks = []
        needed = case.time_limit + 20.0
        if needed > 60.0:  # 60 s is the global pytest-timeout (setup.cfg)
            marks.append(pytest.mark.timeout(int(needed)))
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


@pytest.fixture(scope="module")
def testee_name() -> str:
    name = selected_testee()
    if name not in TESTEES:
        pytest.fail(f"{TESTEE_ENV}={name!r}: expected one of {sorted(TESTEES)}")
    if name == "blockws":
        reason = blockws_unavailable()
        if reason:
            pytest.skip(f"{reason}; set {TESTEE_ENV}=reference to check the fuzzer")
    return name


@pytest.mark.parametrize("case", _params())
def test_autobahn_deflate_case(case: Case, testee_name: str) -> None:
    testee = make_testee(testee_name, case)
    verdict = run_case(case, testee)
    assert verdict.verdict == OK, (
        f"[testee {testee.name}, error {testee.error!r}, close code {testee.close_code}]\n"
        + verdict.explain(case)
    )
    rec = verdict.record
    assert rec.roundtrips == case.roundtrip.count  # type: ignore[union-attr]
    assert rec.tx_compressed == rec.roundtrips


# --------------------------------------------------------------------------------------
# Negotiation: what the fuzzer answers, as Autobahn's fuzzing server would


def _answer(case_id: str, offer: str) -> str | None:
    policy = DEFLATE_CASES_BY_ID[case_id].deflate
    assert policy is not None
    offers = [DeflateOffer.parse(params) for name, params in parse_extensions(offer)
              if name == "permessage-deflate"]
    accept = policy.choose(offers)
    return None if accept is None else accept.extension_string()


@pytest.mark.parametrize(
    ("sub", "answer"),
    [
        ("12.1", "permessage-deflate"),
        ("12.5", "permessage-deflate"),
        ("13.1", "permessage-deflate"),
        ("13.2", "permessage-deflate; client_no_context_takeover"),
        ("13.3", "permessage-deflate; client_max_window_bits=8"),
        ("13.4", "permessage-deflate; client_max_window_bits=15"),
        ("13.5", "permessage-deflate; client_no_context_takeover; client_max_window_bits=8"),
        ("13.6", "permessage-deflate; client_no_context_takeover; client_max_window_bits=15"),
        ("13.7", "permessage-deflate; client_no_context_takeover; client_max_window_bits=8"),
    ],
)
def test_answer_to_the_blockws_offer(sub: str, answer: str) -> None:
    for i in (1, 18):
        assert _answer(f"{sub}.{i}", BLOCKWS_OFFER) == answer


def test_answer_follows_the_offer() -> None:
    # without client_max_window_bits the window cases cannot be accepted (UNIMPLEMENTED),
    # 13.7 falls back to its second choice; no context takeover is always possible
    assert _answer("13.3.1", "permessage-deflate") is None
    assert _answer("13.5.1", "permessage-deflate") is None
    assert _answer("13.7.1", "permessage-deflate") == (
        "permessage-deflate; client_no_context_takeover")
    assert _answer("13.2.1", "permessage-deflate") == (
        "permessage-deflate; client_no_context_takeover")
    # a window value in the offer is only a hint; the server's own parameters are echoed;
    # the first acceptable offer wins
    assert _answer("13.3.1", "permessage-deflate; client_max_window_bits=10") == (
        "permessage-deflate; client_max_window_bits=8")
    assert _answer("13.1.1", "permessage-deflate; server_no_context_takeover; "
                             "server_max_window_bits=10") == (
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=10")
    assert _answer("13.4.1", "x-webkit-deflate-frame, permessage-deflate; "
                             "server_max_window_bits=9, permessage-deflate; "
                             "client_max_window_bits") == (
        "permessage-deflate; client_max_window_bits=15")
    assert _answer("12.1.1", "x-webkit-deflate-frame") is None


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=abc",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; unknown_param",
    ],
)
def test_invalid_offers_are_refused(offer: str) -> None:
    """autobahn refuses these offers (its handshake then fails)."""
    [(_, params)] = parse_extensions(offer)
    with pytest.raises(ValueError):
        DeflateOffer.parse(params)


def test_session_roundtrip_and_window_check() -> None:
    """The fuzzer's compressor is readable by a plain inflater, context takeover and all;
    the window check accepts an 8-bit-window stream and refuses a 15-bit one."""
    offer = DeflateOffer.parse(parse_extensions(BLOCKWS_OFFER)[0][1])
    policy = DEFLATE_CASES_BY_ID["13.3.1"].deflate
    assert policy is not None
    accept = policy.choose([offer])
    assert accept is not None
    session = DeflateSession(accept)
    data = load_testdata("json_data1")
    inflater = zlib.decompressobj(-15)
    for i in range(0, 64 << 10, 4096):
        message = data[i : i + 4096]
        wire = session.compress(message)
        assert inflater.decompress(wire + DEFLATE_TAIL) == message
    # the client side under client_max_window_bits=8: huffman-only and 9-bit zlib are fine
    for strategy, wbits in ((zlib.Z_HUFFMAN_ONLY, 9), (zlib.Z_DEFAULT_STRATEGY, 9)):
        comp = zlib.compressobj(6, zlib.DEFLATED, -wbits, 8, strategy)
        for i in range(0, 32 << 10, 2048):
            wire = (comp.compress(data[i : i + 2048]) + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]
            assert session.check_window(wire) is None
            assert session.inflate(wire) == data[i : i + 2048]
    session = DeflateSession(accept)
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    wire = (comp.compress(data[:8192]) + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]
    problem = session.check_window(wire)
    assert problem is not None and "client_max_window_bits=8" in problem


def test_deflate_max_distance() -> None:
    data = load_testdata("gutenberg_faust")[:50_000]
    for wbits, level in ((9, 6), (12, 1), (15, 9)):
        comp = zlib.compressobj(level, zlib.DEFLATED, -wbits)
        wire = comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)
        longest = deflate_max_distance(wire)
        # zlib reaches back at most 2**wbits - 262 octets (MAX_DIST)
        assert 0 < longest <= (1 << wbits) - 262
    comp = zlib.compressobj(6, zlib.DEFLATED, -15, 8, zlib.Z_HUFFMAN_ONLY)
    assert deflate_max_distance(comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)) == 0
    assert deflate_max_distance(zlib.compress(b"", 0)[2:-4]) == 0  # a final stored block
    for bad in (b"\x07", b"\x04\x00" + DEFLATE_TAIL, b"\x00\x05\x00\x00\x00"):
        with pytest.raises(ValueError):
            deflate_max_distance(bad)


# --------------------------------------------------------------------------------------
# The judge, checked with the reference client and lax variants of it


@pytest.mark.parametrize(
    ("options", "case_id", "verdict"),
    [
        ({"deflate": True}, "12.1.3", OK),
        ({"deflate": True}, "12.2.11", OK),
        ({"deflate": True}, "13.5.4", OK),
        ({"deflate": True}, "13.7.12", OK),
        ({}, "12.1.1", UNIMPLEMENTED),  # no offer
        ({"deflate": True, "deflate_offer": "permessage-deflate"}, "13.3.3", UNIMPLEMENTED),
        ({"deflate": True, "deflate_offer": "permessage-deflate"}, "13.7.3", OK),
        ({"deflate": True, "keep_context": True}, "13.2.3", FAILED),
        ({"deflate": True, "ignore_window": True}, "13.3.4", FAILED),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()),
)
def test_judge_deflate(options: dict[str, Any], case_id: str, verdict: str) -> None:
    case = DEFLATE_CASES_BY_ID[case_id]
    result = run_case(case, ReferenceAdapter(**options))
    assert result.verdict == verdict, result.explain(case)


def test_reference_client_is_lax_as_asked() -> None:
    """The FAILED rows above fail for the intended reason (a violation), not by accident."""
    for options, case_id, needle in (
        ({"keep_context": True}, "13.2.3", "does not inflate"),
        ({"ignore_window": True}, "13.3.4", "client_max_window_bits=8"),
    ):
        testee: TesteeAdapter = ReferenceAdapter(deflate=True, **options)
        result = run_case(DEFLATE_CASES_BY_ID[case_id], testee)
        assert any(needle in v for v in result.record.violations), result.record.violations


def test_deflate_case_table_is_complete() -> None:
    """216 client cases: 12.1-12.5 and 13.1-13.7, 18 message sizes each, as in Autobahn."""
    ids = [c.id for c in DEFLATE_CASES]
    expected = [f"{a}.{b}.{c}" for a, subs in ((12, 5), (13, 7)) for b in range(1, subs + 1)
                for c in range(1, 19)]
    assert ids == expected
    assert len(MSG_SIZES) == 18 and len(DEFLATE_POLICIES) == 7
    for case in DEFLATE_CASES:
        cat, sub, i = (int(x) for x in case.id.split("."))
        length, count, _, fragsize = MSG_SIZES[i - 1]
        rt = case.roundtrip
        assert rt is not None and case.deflate is not None
        assert (rt.length, rt.fragment_size) == (length, fragsize)
        assert 32 <= rt.count <= count and bool(case.scaled) == (rt.count < count)
        name = list(TESTDATA)[sub - 1] if cat == 12 else "json_data1"
        assert rt.binary == TESTDATA[name][1]
        if cat == 13:
            assert case.deflate == DEFLATE_POLICIES[sub - 1][1]
    # the messages are consecutive slices of the data, read as a ring
    rt = DEFLATE_CASES_BY_ID["12.4.10"].roundtrip
    assert rt is not None
    data = load_testdata("html_data1")
    stream = b"".join(rt.payload(k) for k in range(8))
    assert stream == (data * 3)[: 8 * rt.length]
    for name, (_, binary, _) in TESTDATA.items():
        if not binary:
            load_testdata(name).decode("ascii")  # any slice of a text data set is valid UTF-8
