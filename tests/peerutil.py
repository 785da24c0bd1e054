"""Start and stop real peer processes (servers, proxies) for the tests.

Not a test module and no fixtures: conftest.py builds its fixtures from these helpers, and
tests that need an unusual peer (a proxy, an HTTP/2 server) can use them directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

PEERS_DIR = Path(__file__).resolve().parent / "peers"

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class PeerError(RuntimeError):
    """A peer process did not start (it exited, or never listened)."""


def _output(log: IO[bytes]) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode("utf-8", "replace").strip() or "(no output)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still running after a deadline."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


@contextlib.contextmanager
def start_server(
    cmd: Sequence[str],
    port: int | Sequence[int],
    *,
    host: str = "127.0.0.1",
    timeout: float = START_TIMEOUT,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own session until the ``with`` block ends.

    Waits until every port in ``port`` accepts TCP connections on ``host``; raises
    ``PeerError`` with the process's output if it exits first or the ``timeout`` passes.
    On exit the whole process group gets SIGTERM, then SIGKILL after a deadline.
    """
    ports = [port] if isinstance(port, int) else list(port)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            waiting = list(ports)
            while waiting:
                # Polling is the only option here: a peer gives no signal when it listens.
                if proc.poll() is not None:
                    raise PeerError(
                        f"{cmd[0]} exited with code {proc.returncode} before listening on "
                        f"{host}:{waiting[0]}; its output:\n{_output(log)}"
                    )
                if port_open(waiting[0], host):
                    waiting.pop(0)
                    continue
                if time.monotonic() > deadline:
                    raise PeerError(
                        f"{cmd[0]} did not listen on {host}:{waiting[0]} within {timeout} s; "
                        f"its output:\n{_output(log)}"
                    )
                time.sleep(0.05)
            yield proc
        finally:
            _stop(proc)
