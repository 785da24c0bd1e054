"""The Autobahn TestSuite client cases of categories 12 and 13 (permessage-deflate).

Transcribed from crossbario/autobahn-testsuite, ``autobahntestsuite/autobahntestsuite/case/
case12_x_x.py``. Every case is a round-trip test: the fuzzer negotiates permessage-deflate
(the case's ``SERVER_ACCEPT``, here ``DeflatePolicy``), then sends ``COUNT`` compressed
messages of ``LEN`` octets one at a time, each cut from a test data set read as a ring
(Autobahn's ``sendOne``), auto-fragmented to ``AUTOFRAGSIZE`` octets of compressed payload; the
client must echo each one (same type and octets) before the next is sent. When all echoes are
in, the fuzzer closes with 1000 (OK); a wrong echo or the time limit fails the case. A client
that does not negotiate the extension gets UNIMPLEMENTED. ``MSG_SIZES`` is Autobahn's table of
18 (LEN, COUNT, WAITSECS, AUTOFRAGSIZE) rows, used in every sub-category.

* 12.1-12.5: the default offer is accepted as it is (``accept_deflate``), one sub-category per
  test data set, in Autobahn's order (the iteration order of its Python 2 dict
  ``WS_COMPRESSION_TESTDATA``): JSON (text), bitmap (binary), Goethe's Faust (binary), HTML
  (text), PDF (binary).
* 13.1-13.7: the JSON data set, with the server's answer varied (``accept1`` ... ``accept7``,
  as (client_no_context_takeover, client_max_window_bits) choices tried in order):
  13.1 (False, 0), 13.2 (True, 0), 13.3 (False, 8), 13.4 (False, 15), 13.5 (True, 8),
  13.6 (True, 15), 13.7 (True, 8) else (True, 0) else (False, 0). A choice with a window
  needs ``client_max_window_bits`` in the client's offer (blockws sends it), one with no
  context takeover is always possible (autobahn reads every offer as accepting it). The
  client's offer in Autobahn's sub-category titles is what Autobahn offers when *it* is the
  client, which does not apply to client testing. The server's own direction stays at
  context takeover and a 15-bit window, since blockws asks for neither.

Differences from Autobahn:

* The test data sets are synthetic (``load_testdata``), generated deterministically to resemble the
  originals in kind and size, since the originals are third-party files (a Gutenberg text, the
  "Lena" picture, a published PDF, and two Autobahn reports): a JSON and an HTML Autobahn
  report (ASCII, so any slice is valid UTF-8 for the text messages), German verse in UTF-8,
  an 8-bit 512x512 BMP with smooth gradients and noise, and a PDF-like file mixing text
  objects with already-deflated (incompressible) streams.
* Scaled down to fit a test run (``Case.scaled`` says how): Autobahn sends 1000 messages in
  every case, 216,000 messages and 10.9 GB of payload in all, which takes about 5 minutes
  here; each case sends ``scaled_count(LEN)`` messages instead: the full 1000 up to 4096
  octets, then as many as fit in ``SCALE_BUDGET`` (4 MiB) of payload: 512 of 8192 ... 32 of
  131072 octets (still enough to carry the compression context over many messages and
  slide the window through the data): 84,960 messages and 720 MB of payload in all.
  ``BLOCKWS_AUTOBAHN_FULL=1`` restores Autobahn's counts.
  The time limit is ``TIME_LIMIT`` seconds instead of 60-480 (the fuzzer closes then).
* The echoes are compared byte for byte (Autobahn compares type, length and SHA-1), and the
  fuzzer checks more of the client's compression than autobahn does (see ``fuzzserver``):
  RSV bits, inflating under the negotiated no-context-takeover (a fresh inflater per message),
  and back-references within a negotiated window below 15 bits.
"""

from __future__ import annotations

import functools
import math
import os
import random
import struct
import zlib
from typing import Callable

from fuzzserver import (
    FAILED,
    NON_STRICT,
    NORMAL,
    OK,
    UNIMPLEMENTED,
    Case,
    CloseAfter,
    DeflatePolicy,
    Roundtrip,
    StartRoundtrip,
)

__all__ = ["DEFLATE_CASES", "DEFLATE_CASES_BY_ID", "SUBCATEGORIES", "DEFLATE_POLICIES",
           "MSG_SIZES", "TESTDATA", "scaled_count", "OK", "NON_STRICT", "FAILED", "UNIMPLEMENTED"]

#: Autobahn's (payload length, message count, case timeout, auto-fragment size)
MSG_SIZES = [
    (16, 1000, 60, 0),
    (64, 1000, 60, 0),
    (256, 1000, 120, 0),
    (1024, 1000, 240, 0),
    (4096, 1000, 480, 0),
    (8192, 1000, 480, 0),
    (16384, 1000, 480, 0),
    (32768, 1000, 480, 0),
    (65536, 1000, 480, 0),
    (131072, 1000, 480, 0),
    (8192, 1000, 480, 256),
    (16384, 1000, 480, 256),
    (32768, 1000, 480, 256),
    (65536, 1000, 480, 256),
    (131072, 1000, 480, 256),
    (131072, 1000, 480, 1024),
    (131072, 1000, 480, 4096),
    (131072, 1000, 480, 32768),
]

FULL = os.environ.get("BLOCKWS_AUTOBAHN_FULL", "").strip() not in ("", "0")
#: Payload octets per case beyond which the message count is cut (see the module docstring).
SCALE_BUDGET = 4 << 20
#: Seconds until the fuzzer gives up on a case (Autobahn: 60-480 s).
TIME_LIMIT = 30.0


def scaled_count(length: int, count: int = 1000) -> int:
    if FULL:
        return count
    return min(count, SCALE_BUDGET // length)


# --------------------------------------------------------------------------------------
# Test data: synthetic stand-ins for Autobahn's testdata/ files, built when first used


#: the sizes of Autobahn's data1.json and data1.html
JSON_SIZE = 194_056
HTML_SIZE = 379_709


def _json_report() -> bytes:
    """Like testdata/data1.json: an Autobahn master report index (ASCII)."""
    rnd = random.Random(1201)
    ids = [f"{a}.{b}.{c}" for a in (1, 6, 7, 9, 12, 13) for b in range(1, 8)
           for c in range(1, 19)]
    verdicts = ["OK"] * 12 + ["NON-STRICT", "INFORMATIONAL", "FAILED", "UNIMPLEMENTED"]
    agents = ["AutobahnPython/0.6.0", "Chrome/29.0.1531.1"]
    out = ["{\n"]
    for agent in agents:
        slug = agent.lower().replace("/", "_").replace(".", "_").replace("-", "_")
        out.append(f'   "{agent}": {{\n')
        for cid in ids:
            v = rnd.choice(verdicts)
            code = rnd.choice(["1000", "1000", "1002", "null"])
            out.append(
                f'      "{cid}": {{\n'
                f'         "behavior": "{v}",\n'
                f'         "behaviorClose": "{"OK" if v != "FAILED" else "UNCLEAN"}",\n'
                f'         "duration": {int(rnd.expovariate(1 / 40))},\n'
                f'         "remoteCloseCode": {code},\n'
                f'         "reportfile": "{slug}_case_{cid.replace(".", "_")}.json"\n'
                "      },\n"
            )
        out.append("   },\n")
    out.append("}\n")
    return "".join(out).encode("ascii")[:JSON_SIZE]


def _html_report() -> bytes:
    """Like testdata/data1.html: an Autobahn report page, CSS and result tables (ASCII)."""
    rnd = random.Random(1204)
    css = "".join(
        f"td.{name} {{\n   background-color: #{rnd.randrange(1 << 24):06x};\n"
        f"   text-align: {rnd.choice(['center', 'left'])};\n"
        f"   padding: {rnd.randint(2, 16)}px;\n}}\n\n"
        for name in ("case_ok", "case_almost", "case_non_strict", "case_info",
                     "case_unimplemented", "case_failed", "case_missing", "agent", "close")
    )
    head = ("<!DOCTYPE html>\n<html>\n   <head>\n      <meta charset=\"utf-8\" />\n"
            f"      <style lang=\"css\">\n{css}</style>\n   </head>\n   <body>\n"
            "      <table id=\"agent_case_results\">\n")
    agents = ["autobahnpython_0_6_0", "chrome_29_0_1531_1", "firefox_24_0_20130607"]
    outcome = [("case_ok", "Pass")] * 10 + [("case_non_strict", "Non-Strict"),
                                            ("case_failed", "Fail"), ("case_info", "Info")]
    rows = [head]
    for a in range(1, 14):
        for b in range(1, 8):
            rows.append(f"         <tr class=\"case_subcategory_row\">\n            <td class="
                        f"\"case_subcategory\" colspan=\"7\">{a}.{b} Sub-category</td>\n"
                        "         </tr>\n")
            for c in range(1, rnd.randint(8, 30)):
                cid = f"{a}_{b}_{c}"
                cells = []
                for agent in agents:
                    cls, text = rnd.choice(outcome)
                    code = rnd.choice(["1000", "1000", "None", "1002"])
                    cells.append(
                        f"            <td class=\"{cls}\"><a href=\"{agent}_case_{cid}.html\">"
                        f"{text}</a></td><td class=\"close close_hide {cls}\"><span "
                        f"class=\"close_code\">{code}</span></td>\n")
                rows.append(
                    "         <tr class=\"agent_case_result_row\">\n"
                    f"            <td class=\"case\"><a href=\"#case_desc_{cid}\">Case "
                    f"{cid.replace('_', '.')}</a></td>\n" + "".join(cells) + "         </tr>\n")
    rows.append("      </table>\n   </body>\n</html>\n")
    return "".join(rows).encode("ascii")[:HTML_SIZE]


_GERMAN = (
    "und der die das ich du er sie es wir ihr nicht mit mich dich sich ein eine mein dein "
    "Geist Herz Welt Natur Himmel Erde Nacht Tag Licht Seele Leben Tod Zeit Kunst Glück "
    "Mädchen Bürger Schüler Männer Väter Mütter Brüder Tränen Füße Höhle Götter Flöße "
    "schön süß müde früh grün kühn größer heißt weiß Straße Fluß Gruß Schoß Genuß "
    "läßt wüßt hätt würde möchte könnt müßt fließen grüßen küssen lösen hören führen "
    "Faust Wagner Mephistopheles Gretchen Marthe Hexe Chor Engel Geister Schäfer "
    "doch noch schon nur auch wohl gar sehr so wie wo wenn als ob daß weil denn "
    "erstanden verkündigt Frühlingsfeier Himmelslieder Zauberspiegel Gespräch"
).split()


def _faust() -> bytes:
    """Like testdata/pg2229.txt: German verse in UTF-8 (sent as binary, as in Autobahn)."""
    rnd = random.Random(1203)
    out = ["The Project Gutenberg EBook of Faust (synthetic stand-in)\n\n"]
    size = 0
    while size < 222_000:
        speaker = rnd.choice(_GERMAN).upper()
        lines = [f"  {speaker}:\n"]
        for _ in range(rnd.randint(2, 14)):
            words = rnd.choices(_GERMAN, k=rnd.randint(3, 8))
            words[0] = words[0][:1].upper() + words[0][1:]
            lines.append("  " + " ".join(words) + rnd.choice([",", ";", "!", ".", "?", ""]) + "\n")
        block = "".join(lines) + "\n"
        out.append(block)
        size += len(block.encode("utf-8"))
    return "".join(out).encode("utf-8")


def _bitmap() -> bytes:
    """Like testdata/lena512.bmp: an 8-bit grey 512x512 BMP (smooth shapes plus noise)."""
    rnd = random.Random(1202)
    w = h = 512
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    header = (b"BM" + struct.pack("<IHHI", offset + w * h, 0, 0, offset)
              + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 0, w * h, 2835, 2835, 256, 0))
    sx = [50 * math.sin(x / 37.0) for x in range(w)]
    cy = [45 * math.cos(y / 23.0) for y in range(h)]
    sxy = [25 * math.sin(k / 51.0) for k in range(w + h)]
    rows = []
    for y in range(h):
        noise = rnd.getrandbits(8 * w).to_bytes(w, "little")
        base = 128 + cy[y]
        rows.append(bytes(min(255, max(0, int(base + sx[x] + sxy[x + y]) + (noise[x] & 7)))
                          for x in range(w)))
    return header + palette + b"".join(rows)


def _pdf() -> bytes:
    """Like testdata/10.1.1.105.5439.pdf: a ~1 MB PDF, text objects and deflated streams."""
    rnd = random.Random(1205)
    english = ("the of and to in is that for on with as by this are be from we an which "
               "WebSocket protocol message frame compression window deflate server client "
               "latency throughput figure table section results network performance").split()
    out = [b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"]
    offsets = []
    size, n = len(out[0]), 0
    while size < 1_040_000:
        n += 1
        offsets.append(size)
        if n % 3:
            text = " ".join(rnd.choices(english, k=rnd.randint(200, 900))).encode()
            body = zlib.compress(text, 9)
            obj = (b"%d 0 obj\n<< /Length %d /Filter /FlateDecode >>\nstream\n"
                   % (n, len(body)) + body + b"\nendstream\nendobj\n")
        else:
            lines = b"".join(
                b"BT /F%d %d Tf %d %d Td (%s) Tj ET\n"
                % (rnd.randint(1, 4), rnd.randint(8, 14), rnd.randint(50, 500),
                   rnd.randint(50, 750), " ".join(rnd.choices(english, k=8)).encode())
                for _ in range(rnd.randint(5, 40)))
            obj = (b"%d 0 obj\n<< /Type /Page /Parent 2 0 R /Contents %d 0 R "
                   b"/Resources << /Font << /F1 5 0 R >> >> >>\nstream\n" % (n, n + 1)
                   + lines + b"endstream\nendobj\n")
        out.append(obj)
        size += len(obj)
    xref = [b"xref\n0 %d\n0000000000 65535 f \n" % (n + 1)]
    xref += [b"%010d 00000 n \n" % off for off in offsets]
    out += xref + [b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (n + 1, size)]
    return b"".join(out)


@functools.cache
def load_testdata(name: str) -> bytes:
    return TESTDATA[name][2]()


#: name -> (description, binary, generator); Autobahn's order of 12.1 ... 12.5
TESTDATA: dict[str, tuple[str, bool, Callable[[], bytes]]] = {
    "json_data1": ("Large JSON data file", False, _json_report),
    "lena512": ("Bitmap 512x512 8-bit grey (stand-in for Autobahn's Lena picture)", True,
                _bitmap),
    "gutenberg_faust": ("Human readable text, German verse (stand-in for Goethe's Faust I)",
                        True, _faust),
    "html_data1": ("Large HTML file", False, _html_report),
    "ooms": ("A larger PDF", True, _pdf),
}

#: 13.1 ... 13.7: (Autobahn's accept function, its docstring's choices, Autobahn's own
#: client offers (requestNoContextTakeover, requestMaxWindowBits) for the titles)
DEFLATE_POLICIES: list[tuple[str, DeflatePolicy, str]] = [
    ("accept1", DeflatePolicy(((False, 0),)), "[(False, 0)]"),
    ("accept2", DeflatePolicy(((True, 0),)), "[(True, 0)]"),
    ("accept3", DeflatePolicy(((False, 8),)), "[(False, 8)]"),
    ("accept4", DeflatePolicy(((False, 15),)), "[(False, 15)]"),
    ("accept5", DeflatePolicy(((True, 8),)), "[(True, 8)]"),
    ("accept6", DeflatePolicy(((True, 15),)), "[(True, 15)]"),
    ("accept7", DeflatePolicy(((True, 8), (True, 0), (False, 0))),
     "[(True, 8), (True, 0), (False, 0)]"),
]
ACCEPT_DEFLATE = DeflatePolicy(((False, 0),))  # 12.x: accept the first offer as it is

SUBCATEGORIES: dict[str, str] = {}
CASES: list[Case] = []


def _size_text(length: int) -> str:
    return str(length)


def _deflate_case(case_id: str, description: str, length: int, count: int, waitsecs: int,
                  fragsize: int, name: str, policy: DeflatePolicy) -> Case:
    binary = TESTDATA[name][1]
    n = scaled_count(length, count)
    scaled = "" if n == count else f"{n} messages instead of {count}"
    return Case(
        id=case_id,
        description=description,
        expectation=f"Receive echo'ed messages (with payload as sent). Timeout case after "
                    f"{waitsecs} secs.",
        steps=(StartRoundtrip(), CloseAfter(TIME_LIMIT)),
        expected={},
        closed_by_me=True,
        close_codes=(NORMAL,),
        require_clean=True,
        roundtrip=Roundtrip(n, length, binary, data=functools.partial(load_testdata, name),
                            fragment_size=fragsize),
        deflate=policy,
        time_limit=TIME_LIMIT + 5.0,
        scaled=scaled,
    )


for _j, _name in enumerate(TESTDATA, 1):
    _desc, _binary, _ = TESTDATA[_name]
    SUBCATEGORIES[f"12.{_j}"] = f"{_desc} ({'binary' if _binary else 'utf8'})"
    for _i, (_len, _count, _wait, _frag) in enumerate(MSG_SIZES, 1):
        CASES.append(_deflate_case(
            f"12.{_j}.{_i}",
            f"Send {_count} compressed messages each of payload size {_len}, auto-fragment to "
            f"{_frag} octets. Use default permessage-deflate offer.",
            _len, _count, _wait, _frag, _name, ACCEPT_DEFLATE))

for _j, (_fn, _policy, _offers) in enumerate(DEFLATE_POLICIES, 1):
    _co = f"client offers (requestNoContextTakeover, requestMaxWindowBits): {_offers}"
    _sa = ("server accept (requestNoContextTakeover, requestMaxWindowBits): "
           f"{[(nct, bits) for nct, bits in _policy.choices]}")
    SUBCATEGORIES[f"13.{_j}"] = f"{TESTDATA['json_data1'][0]} (utf8) - {_co} / {_sa}"
    for _i, (_len, _count, _wait, _frag) in enumerate(MSG_SIZES, 1):
        CASES.append(_deflate_case(
            f"13.{_j}.{_i}",
            f"Send {_count} compressed messages each of payload size {_len}, auto-fragment to "
            f"{_frag} octets. Use permessage-deflate {_co}",
            _len, _count, _wait, _frag, "json_data1", _policy))


def _key(case: Case) -> tuple[int, ...]:
    return tuple(int(x) for x in case.id.split("."))


DEFLATE_CASES: list[Case] = sorted(CASES, key=_key)
DEFLATE_CASES_BY_ID: dict[str, Case] = {c.id: c for c in DEFLATE_CASES}
assert len(DEFLATE_CASES_BY_ID) == len(DEFLATE_CASES) == 216, "duplicate case ids"
