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
    cmd: Sequence[str], port: int, timeout: float = 15.0, log: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` in its own session, wait for ``port``, kill the group on exit.

    ``log`` names a file for the server's stderr; by default it goes to a pipe
    that is read only if the server dies (fine for quiet servers).
    """
    errfile = open(log, "wb") if log else None
    proc = subprocess.Popen(
        list(cmd),
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=errfile or subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                if errfile is not None:
                    errfile.close()
                    with open(errfile.name, "rb") as f:
                        err = f.read().decode(errors="replace")
                else:
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
        if errfile is not None:
            errfile.close()


def run_child(
    module: str,
    args: Sequence[str],
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; it prints one JSON line.

    The child runs in its own session; on timeout its whole process group is
    killed (threads or grandchildren included) and ``TimeoutError`` raised.
    ``env`` adds variables to the child's environment.
    """
    cmd = [sys.executable, "-m", module, "--child", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **env} if env else None,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
        raise TimeoutError(f"{' '.join(cmd)} took longer than {timeout} s") from None
    finally:
        if proc.poll() is None:
            kill_group(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the process group that ``proc`` leads (it was started in a new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def proc_cpu(pid: int) -> float:
    """CPU seconds (all threads) used so far by process ``pid`` (Linux).

    Sums the nanosecond run times of ``/proc/PID/task/*/schedstat``; falls back
    to the 10 ms ticks of ``/proc/PID/stat``. Threads that already exited are
    not counted by the former (the benchmark server has one thread).
    """
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(FileNotFoundError),
                open(f"/proc/{pid}/task/{tid}/schedstat") as f,
            ):
                total += int(f.read().split()[0])
        if total:
            return total / 1e9
    except (FileNotFoundError, PermissionError, ValueError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus`` (sched_setaffinity is per thread)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cpus)


def cpu_seconds() -> float:
    """CPU time (user + system, every thread) of this process so far, to the nanosecond.

    ``time.process_time()`` (CLOCK_PROCESS_CPUTIME_ID) rather than ``os.times()``,
    whose 10 ms ticks are too coarse for short measurements.
    """
    return time.process_time()


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
