"""The game samples run headless, offline, and exchange real messages.

Each runs in a fresh interpreter with ``--frames N --headless`` against the
embedded echo server it starts itself, and must report messages that went to
the server and came back (its last line: ``S sent, R received in F frames``).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULT = re.compile(r"^(\d+) sent, (\d+) received in (\d+) frames$", re.M)


def need(module: str) -> Any:
    """Import an engine; a missing one skips the test, except in CI, which installs
    the ``games`` extra (.ci/run): there it fails, so a lost install step shows."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def run_sample(name: str, *args: str) -> tuple[str, int, int, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYGAME_HIDE_SUPPORT_PROMPT": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "samples" / name), "--headless", *args],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    match = RESULT.search(proc.stdout)
    assert match, proc.stdout
    sent, received, frames = (int(g) for g in match.groups())
    return proc.stdout, sent, received, frames


@pytest.mark.timeout(120)
def test_game_loop_waits_in_ws_wait() -> None:
    out, sent, received, frames = run_sample("game_loop.py", "--frames", "60")
    assert frames == 60 and sent >= 4  # every 10 frames, once open
    assert received == sent  # at 60 Hz, every echo is back before the close
    assert "disconnected: 1000" in out


@pytest.mark.timeout(120)
def test_pygame_chat_wakes_for_each_echo() -> None:
    need("pygame")
    out, sent, received, frames = run_sample("pygame_chat.py", "--frames", "60")
    assert frames == 60
    assert received >= 3 and sent - received in (0, 1)  # the last line may be in flight
    wakeups = int(re.search(r"(\d+) wake-ups for the network", out).group(1))  # type: ignore[union-attr]
    assert wakeups >= received  # on_open, then one per echo (coalesced, never per message)


@pytest.mark.timeout(120)
def test_pygame_arena_sends_every_frame_and_draws_everyone() -> None:
    need("pygame")
    out, sent, received, frames = run_sample("pygame_arena.py", "--frames", "60", "--bots", "2")
    assert frames == 60
    assert received >= sent // 2 and received <= sent
    assert "3 entities drawn" in out
    assert "update_all(max_time=0.002) per frame" in out


@pytest.mark.timeout(120)
def test_panda3d_ticker_shows_messages() -> None:
    need("panda3d")
    out, sent, received, frames = run_sample("panda3d_ticker.py", "--frames", "60")
    assert frames == 60
    assert received >= 2 and received <= sent
    assert re.search(r"shown:.*< tick \d+ at", out), out
    assert "disconnected: 1000" in out
