"""The front door: `python -m blockws` (offline demo and interactive client) and samples/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from blockws.server import EchoServer

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


@pytest.mark.timeout(90)
def test_demo_runs_offline_and_exits_0() -> None:
    result = run("-m", "blockws")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "< hello, blockws" in out
    assert "< héllo wörld ✓" in out
    assert "< <16384 bytes binary>" in out
    assert "ping/pong latency:" in out
    assert "closed: code 1000" in out


@pytest.mark.timeout(90)
def test_interactive_client_sends_lines_and_prints_messages() -> None:
    with EchoServer() as server:
        result = run(
            "-m", "blockws", server.url, stdin="first line\n/ping\nsecond\n/close 4000 bye\n"
        )
        assert server.echoed == 2
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("* connected (HTTP/1.1")
    assert lines[1:3] == ["< first line", "< second"]
    assert lines[3].startswith("* closed: 4000")


def test_interactive_client_rejects_bad_url() -> None:
    result = run("-m", "blockws", "http://example.com/")
    assert result.returncode == 2
    assert "scheme must be ws or wss" in result.stderr


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
