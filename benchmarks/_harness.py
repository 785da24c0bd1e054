"""Shared benchmark plumbing: servers in their own process, clients in fresh subprocesses.

Every measurement runs in a new Python process (``python -m benchmarks.<module>
--child ...``) so one client's imports, threads or garbage cannot slow the
next. Clients are interleaved round by round (A B C, A B C, ...), and the
median of the rounds is reported together with each client's ratio to a
reference client. Figures from this shared VM are noisy; the ratios, taken
side by side in one run, are what to quote.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(
    cmd: Sequence[str], port: int, timeout: float = 15.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` in its own session, wait for ``port``, kill the group on exit."""
    proc = subprocess.Popen(
        list(cmd),
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"server {cmd} exited: {err}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {cmd} did not listen on {port}")
            time.sleep(0.05)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_child(module: str, args: Sequence[str], timeout: float = 300.0) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; it prints one JSON line."""
    cmd = [sys.executable, "-m", module, "--child", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far."""
    t = os.times()
    return t.user + t.system


def table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Format ``rows`` as a Markdown table; ``columns`` = (key, heading, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
