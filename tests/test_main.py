"""The front door: ``python -m blockws`` (offline demo and client) and samples/.

Every option and interactive command of the client is run here as a user would run it,
in a subprocess, against real servers: the `websockets` echo peer (plain and TLS with a
private CA), hypercorn over HTTP/2, and raw-socket servers for a rejected upgrade and a
dropped connection.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from faultserver import Peer, fault_server
from test_proxy import ProxyPeer, tinyproxy_auth  # noqa: F401 - the fixture, for --proxy

from blockws.__main__ import COMMANDS, hexdump
from blockws.server import EchoServer
from peerutil import free_port

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return run("-m", "blockws", *args, stdin=stdin)


def one_line_error(result: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert text in lines[0]


def replies(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("< ")]


# -- the demo and the samples ---------------------------------------------------------------


@pytest.mark.timeout(90)
def test_demo_runs_offline_and_exits_0() -> None:
    result = cli()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "< hello, blockws" in out
    assert "< héllo wörld ✓" in out
    assert "< <16384 bytes binary>" in out
    assert "ping/pong latency:" in out
    assert "closed: code 1000" in out


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "sample, expected",
    [
        ("sync_script.py", "received: b'\\x00\\x01\\x02 binary'"),
        ("game_loop.py", "disconnected: 1000"),
    ],
)
def test_samples_run_offline(sample: str, expected: str) -> None:
    args = [str(ROOT / "samples" / sample)]
    if sample == "game_loop.py":
        args += ["--frames", "90"]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


# -- help ------------------------------------------------------------------------------------


def test_help_lists_every_option_and_command() -> None:
    result = cli("--help")
    assert result.returncode == 0
    out = result.stdout
    for option in ["-v", "-H", "--header", "--subprotocol", "--origin", "--cafile",
                   "--insecure", "--proxy", "--http1", "--ping", "--eof-wait", "--text",
                   "--binary", "--replies", "--dump-bytes", "--timeout"]:
        assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", out), option
    for command in ["/ping", "/close", "/binary", "/stats", "/help", "//TEXT"]:
        assert command in out, command
    assert "exit statuses" in out
    assert set(COMMANDS) <= {line.strip().split("  ")[0] for line in out.splitlines()}


# -- interactive use -------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_interactive_client_sends_lines_and_prints_messages() -> None:
    with EchoServer() as server:
        result = cli(server.url, stdin="first line\n/ping\nsecond\n/close 4000 bye\n")
        assert server.echoed == 2
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("* connected (HTTP/1.1")
    assert replies(result) == ["first line", "second"]
    assert lines[-1].startswith("* closed: 4000 ")  # the server's echo of our close


@pytest.mark.timeout(60)
def test_end_of_input_waits_for_the_replies(websockets_server: str) -> None:
    """The bug: end of input closed at once and printed only the first reply."""
    result = cli(websockets_server, stdin='hello\n{"id":1}\nlast\n')
    assert result.returncode == 0, result.stderr
    assert replies(result) == ["hello", '{"id":1}', "last"]
    assert result.stdout.splitlines()[-1] == "* closed: 1000 ''"


@pytest.mark.timeout(60)
def test_eof_wait_bounds_the_wait(websockets_server: str) -> None:
    # The server pings after "!ping" and sends nothing else: the quiet time ends it.
    result = cli(websockets_server, "--eof-wait", "0.3", stdin="!ping\n")
    assert result.returncode == 0, result.stderr
    assert replies(result) == []
    result = cli(websockets_server, "--eof-wait", "x")
    assert result.returncode == 2 and "--eof-wait" in result.stderr


@pytest.mark.timeout(60)
def test_commands_binary_stats_slash_and_unknown(websockets_server: str) -> None:
    stdin = "/binary 00 01 ff\n//slash\nhello\n/nope\n/binary zz\n/stats\n/help\n"
    result = cli(websockets_server, stdin=stdin)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "< binary, 3 bytes\n  000000  00 01 ff" in out
    assert "< /slash" in out and "< hello" in out
    assert "! unknown command /nope" in result.stderr
    assert "! non-hexadecimal number" in result.stderr
    stats = next(line for line in out.splitlines() if line.startswith("* stats: "))
    assert "http_version 1.1" in stats and "subprotocol none" in stats
    assert "sent 3 messages" in stats and "extensions " in stats and "latency " in stats
    assert re.search(r"received \d+ messages / \d+ bytes", stats)
    assert "/close [CODE [REASON]]" in out  # /help
    assert out.splitlines()[-1] == "* closed: 1000 ''"


@pytest.mark.timeout(60)
def test_ping_command_prints_the_round_trip(websockets_server: str) -> None:
    result = cli(websockets_server, stdin="/ping hi\n")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\* pong: round trip \d+\.\d\d ms$", result.stdout, re.M)


@pytest.mark.timeout(60)
def test_ping_option_prints_each_latency(websockets_server: str) -> None:
    result = cli(websockets_server, "--ping", "0.1", "--eof-wait", "1", stdin="")
    assert result.returncode == 0, result.stderr
    pongs = re.findall(r"^\* pong: round trip \d+\.\d\d ms$", result.stdout, re.M)
    assert len(pongs) >= 3, result.stdout
    assert cli(websockets_server, "--ping", "0.01").returncode == 2


# -- the handshake options --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_header_origin_subprotocol(websockets_server: str) -> None:
    result = cli(websockets_server, "-H", "X-Token: abc", "--header", "X-Two:2",
                 "--origin", "https://game.example", "--subprotocol", "nope", "-s", "chat",
                 "--text", "!headers")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("* connected (HTTP/1.1, subprotocol chat, ")
    seen = json.loads(replies(result)[0])["headers"]
    assert seen["x-token"] == "abc" and seen["x-two"] == "2"
    assert seen["origin"] == "https://game.example"
    assert seen["sec-websocket-protocol"] == "nope, chat"
    result = cli(websockets_server, "-H", "no colon")
    assert result.returncode == 2 and "bad header" in result.stderr


@pytest.mark.timeout(60)
def test_verbose_traces_frames_and_headers(websockets_server: str) -> None:
    result = cli(websockets_server, "-v", "-H", "Authorization: Bearer s3cret", "--text", "hi")
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "#1 > TEXT fin=1 rsv=" in err and "#1 < TEXT fin=1 rsv=" in err
    assert "Authorization: <redacted>" in err and "s3cret" not in err
    assert "#1 state OPEN -> CLOSING" in err


# -- TLS, HTTP versions, proxy -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_tls_failure_then_cafile_then_insecure(websockets_tls_server: str, tls_certs: Any) -> None:
    one_line_error(cli(websockets_tls_server, "--text", "x"), 3, "TLS certificate of localhost:")
    result = cli(websockets_tls_server, "--cafile", tls_certs.cafile, "--text", "private CA")
    assert result.returncode == 0, result.stderr
    assert replies(result) == ["private CA"]
    assert "WARNING" not in result.stderr
    result = cli(websockets_tls_server, "--insecure", "--text", "unverified")
    assert result.returncode == 0, result.stderr
    assert replies(result) == ["unverified"]
    assert "WARNING: --insecure" in result.stderr and "NOT verified" in result.stderr
    one_line_error(cli(websockets_tls_server, "--cafile", "/nonexistent.pem"), 2, "--cafile")


@pytest.mark.timeout(90)
def test_http2_by_default_and_http1_when_asked(hypercorn_h2_server: Any, tls_certs: Any) -> None:
    url = hypercorn_h2_server.wss
    result = cli(url, "--cafile", tls_certs.cafile, "--text", "!version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("* connected (HTTP/2,")
    assert replies(result) == ["2"]
    result = cli(url, "--cafile", tls_certs.cafile, "--http1", "--text", "!version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("* connected (HTTP/1.1,")
    assert replies(result) == ["1.1"]


@pytest.mark.timeout(60)
def test_proxy_option(tinyproxy_auth: ProxyPeer, websockets_server: str) -> None:  # noqa: F811
    """``--proxy http://user:pass@host:port`` goes through the proxy (tinyproxy), and a
    refusal is one line naming the status, without the credentials."""
    port = int(websockets_server.rsplit(":", 1)[1].split("/")[0])
    url = f"ws://localhost:{port}/"
    result = cli(url, "--text", "through the proxy", "--proxy", tinyproxy_auth.with_credentials())
    assert result.returncode == 0, result.stderr
    assert replies(result) == ["through the proxy"]
    assert tinyproxy_auth.logged(f"localhost:{port}")
    refused = cli(url, "--text", "x", "--proxy", tinyproxy_auth.url)
    one_line_error(refused, 3, "407")
    assert tinyproxy_auth.password not in refused.stderr + refused.stdout


# -- one-shot use and exit statuses ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_text_one_shot(websockets_server: str) -> None:
    result = cli(websockets_server, "--text", "ping me")
    assert result.returncode == 0, result.stderr
    assert replies(result) == ["ping me"]
    assert result.stdout.splitlines()[-1] == "* closed: 1000 ''"


@pytest.mark.timeout(60)
def test_binary_one_shot_with_an_abbreviated_hexdump(websockets_server: str) -> None:
    data = bytes(range(256)) + b"tail"
    result = cli(websockets_server, "--binary", data.hex(), "--dump-bytes", "32")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "< binary, 260 bytes\n" in out
    assert "  000000  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  |................|" in out
    assert "  000010  10 11" in out and "  000020" not in out
    assert "  ... 228 more bytes" in out
    one_line_error(cli(websockets_server, "--binary", "xyz"), 2, "--binary takes hex digits")


@pytest.mark.unit
def test_hexdump_shows_ascii_and_what_was_left_out() -> None:
    assert hexdump(b"AB\x00", 256) == ["  000000  41 42 00" + " " * 39 + "  |AB.|"]
    assert hexdump(bytes(40), 16)[-1] == "  ... 24 more bytes"
    assert len(hexdump(bytes(40), 16)) == 2


@pytest.mark.timeout(60)
def test_replies_counts_messages_before_closing(websockets_server: str) -> None:
    result = cli(websockets_server, "--text", "!subprotocol", "-s", "superchat", "--replies", "0",
                 "--eof-wait", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "* closed: 1000 ''"


@pytest.mark.timeout(60)
def test_server_close_code_gives_status_1(websockets_server: str) -> None:
    result = cli(websockets_server, "--text", "!close 4001 go away", "--replies", "5")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout.splitlines()[-1] == "* closed: 4001 'go away'"


@pytest.mark.timeout(60)
def test_connection_dropped_after_open_gives_status_4() -> None:
    def handler(peer: Peer) -> None:
        peer.handshake()
        peer.read_frame()
        peer.reset()

    with fault_server(handler) as server:
        result = cli(server.url, "--text", "hello", "--replies", "5")
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert re.search(r"^\* closed: 1006 '': ", result.stdout, re.M)


# -- errors before the socket opens: one line, non-zero, no traceback -------------------------


def test_bad_url() -> None:
    one_line_error(cli("http://example.com/"), 2, "scheme must be ws or wss")
    one_line_error(cli("ws://"), 2, "error: ")


@pytest.mark.timeout(60)
def test_connection_refused() -> None:
    one_line_error(cli(f"ws://127.0.0.1:{free_port()}/", "--text", "x"), 3, "refused")


@pytest.mark.timeout(60)
def test_upgrade_rejected_with_403() -> None:
    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    with fault_server(handler) as server:
        one_line_error(cli(server.url), 3, "HTTP 403 Forbidden")


def test_text_and_binary_need_a_url() -> None:
    result = cli("--text", "x")
    assert result.returncode == 2 and "need a URL" in result.stderr


@pytest.mark.timeout(60)
def test_ctrl_c_in_a_session_closes_cleanly_and_exits_130() -> None:
    """Ctrl-C while the client waits for input: it closes the socket (1000), prints how
    it closed, and exits with 130, without a traceback."""
    with EchoServer() as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blockws", server.url], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().startswith("* connected")
            proc.stdin.write("before\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "< before\n"
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    assert out.splitlines()[-1].startswith("* closed: 1000 ")


@pytest.mark.timeout(90)
def test_demo_with_verbose_traces_its_frames() -> None:
    result = cli("--verbose")
    assert result.returncode == 0, result.stderr
    assert "< hello, blockws" in result.stdout
    # The trace logs each frame both ways (blockws.trace, on stderr).
    assert "TEXT" in result.stderr and "hello, blockws" in result.stderr, result.stderr[:2000]
