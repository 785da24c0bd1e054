"""Game-loop fitness: what blockws costs a program that pumps it once per frame.

    python -m benchmarks.gameloop [--quick]     (also part of ``python -m benchmarks``)

Three measurements, each in a fresh interpreter pinned to the client CPU,
against the benchmark server (``benchmarks/server.py``) on the other CPU:

* ``update() idle``: ns per ``ws.update()`` call on an open socket with
  nothing pending (and ``blockws.update_all()`` with that one socket), beside
  two baselines: an empty ``for`` loop calling a trivial function, and testing
  an empty deque. Target: under 1 us.
* Dispatch latency: the server streams 64 B binary messages (500 a second)
  whose first 8 bytes are ``time.perf_counter_ns()`` at write time
  (CLOCK_MONOTONIC: one clock for every process of the host); the callback
  takes ``perf_counter_ns()`` minus that stamp. Two loops: one that pumps at
  1 kHz (``update()``, then sleep to the next millisecond: up to 1 ms of the
  latency is the pump period), one that blocks in ``ws.wait()``, and one
  that sleeps in ``pygame.event.wait()`` and is woken by the event
  ``blockws.integrations.pygame.attach()`` posts (``on_pending``). The
  figure includes the cross-CPU wake-up of the reader thread (about 70 us on
  this VM). Beside them, a baseline without blockws: a thread posting a
  stamped pygame event at the same rate to a loop in ``pygame.event.wait()``
  (pygame's wait polls its queue, sleeping 1 ms between looks: its
  ``_pg_event_wait`` in ``src_c/event.c``).
* Frame-time overrun: a 60 Hz loop whose frames run ``ws.update()`` and then a
  fixed amount of CPU work (calibrated to 8 ms with no network), for 600 frames
  (10 s; ``--quick``: 60), while the server streams 64 B messages at 10 k and
  100 k a second, against the same loop with no socket at all. A frame's time is
  from its start to the end of its work; its overrun is that time minus the
  median frame time without the network. The reader thread's parsing (it
  competes for the GIL) and the callbacks that ``update()`` runs both land in
  the overrun. Target: p99 under 1 ms at 10 k msgs/s. The table also gives the
  frames that ended after the next frame was due (missed) and the messages
  dispatched. The loop waits for its next frame in one of two ways:
  ``time.sleep()``, as most game loops do, with the reader thread parsing
  whenever data comes (during the frames too), or ``ws.wait()`` + ``update()``,
  where the loop's own thread reads and dispatches in its idle time and the
  reader thread stays parked. Each row also gives the time stolen from the
  frame's work (its wall time minus the game thread's CPU time over it,
  ``time.thread_time()``: waiting for the GIL or for a CPU; the row without
  network shows the host's own share), the lag of a message (server write to
  callback, in frames), and the messages the server says it sent, against those
  dispatched: the loop keeps pumping after its last frame until every stream has
  ended.
* The frame budget and the loads a real game brings, each loop idling in a
  wait with a 2 ms budget per ``update()``: at 100 k msgs/s, one socket
  (``ws.update(max_time=0.002)``) and 8 sockets sharing the rate pumped by
  one ``blockws.update_all(max_time=0.002)``; then, from
  ``benchmarks/tls_stream.py`` (``wss://``, permessage-deflate on, HTTP/1.1):
  100 k msgs/s of ~64 B JSON (each parsed with ``json.loads``), and a 256 KiB
  binary snapshot 60 times a second.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import ssl
import struct
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from ._harness import cpu_seconds, free_port, pin, run_child, server, table

perf = time.perf_counter
perf_ns = time.perf_counter_ns
thread_time = time.thread_time
FPS = 60.0
WORK_MS = 8.0
_stamp = struct.Struct("!Q")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] if s else float("nan")


def busy(n: int) -> int:
    """Fixed pure-Python CPU work (holds the GIL, as game logic does)."""
    x = 0
    for i in range(n):
        x += i * i & 7
    return x


def calibrate(ms: float) -> int:
    n = 20_000
    while True:
        t = perf()
        busy(n)
        took = perf() - t
        if took > 0.002:
            break
        n *= 2
    runs = []
    for _ in range(5):
        t = perf()
        busy(n)
        runs.append(perf() - t)
    per = sorted(runs)[2] / n
    return max(1, int(ms / 1e3 / per))


def connect(url: str, **callbacks: Any) -> Any:
    import blockws

    return blockws.connect(url, timeout=10, extensions=[], **callbacks)


# -- the child side -----------------------------------------------------------------------


def child_update_idle(args: argparse.Namespace) -> dict[str, Any]:
    import blockws

    ws = connect(args.url)
    n = args.calls
    update, update_all = ws.update, blockws.update_all
    dq: collections.deque[int] = collections.deque()

    def trivial() -> int:
        return 0

    def timed(fn: Callable[[], Any]) -> float:
        best = []
        for _ in range(5):
            t = perf_ns()
            for _ in range(n):
                fn()
            best.append((perf_ns() - t) / n)
        return sorted(best)[2]

    def deque_check() -> float:
        best = []
        for _ in range(5):
            t = perf_ns()
            for _ in range(n):
                if dq:
                    pass
            best.append((perf_ns() - t) / n)
        return sorted(best)[2]

    out = {
        "update_ns": timed(update),
        "update_all_ns": timed(update_all),
        "call_trivial_ns": timed(trivial),
        "deque_check_ns": deque_check(),
        "calls": n,
    }
    ws.close()
    ws.join(5)
    ws.update()
    return out


def child_pygame_alone(args: argparse.Namespace) -> dict[str, Any]:
    """The baseline of the ``pygame.event.wait()`` row, without blockws: a
    thread posts a stamped pygame event at the same rate, the main thread
    sleeps in ``pygame.event.wait()``. What pygame's wait itself costs (it
    polls its queue with a 1 ms ``SDL_Delay`` between looks)."""
    import threading

    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    pygame.display.init()
    pygame.display.set_mode((16, 16))
    kind = pygame.event.custom_type()
    pygame.event.clear()
    count = max(1, int(args.rate * args.seconds))
    stop = threading.Event()

    def poster() -> None:
        period = 1.0 / args.rate
        tick = perf()
        for _ in range(count):
            tick += period
            delay = tick - perf()
            if delay > 0 and stop.wait(delay):
                return
            pygame.event.post(pygame.event.Event(kind, stamp=perf_ns()))

    lat: list[int] = []
    thread = threading.Thread(target=poster, name="bench-pygame-poster")
    c0, t0 = cpu_seconds(), perf()
    thread.start()
    deadline = perf() + args.seconds + 10
    while len(lat) < count and perf() < deadline:
        event = pygame.event.wait(500)
        if event.type == kind:
            lat.append(perf_ns() - event.stamp)
    elapsed, cpu = perf() - t0, cpu_seconds() - c0
    stop.set()
    thread.join()
    pygame.display.quit()
    us = [x / 1e3 for x in lat]
    return {
        "mode": args.mode,
        "msgs": len(lat),
        "sent": count,
        "p50_us": pct(us, 0.5),
        "p99_us": pct(us, 0.99),
        "max_us": max(us) if us else float("nan"),
        "client_cpu_pct": 100 * cpu / elapsed,
    }


def child_latency(args: argparse.Namespace) -> dict[str, Any]:
    if args.mode == "pygame-alone":
        return child_pygame_alone(args)
    lat: list[int] = []
    state = {"done": False, "sent": 0}
    unpack = _stamp.unpack_from

    def on_binary(ws: Any, seg: Any) -> None:
        now = perf_ns()
        lat.append(now - unpack(seg.data, seg.offset)[0])

    def on_message(ws: Any, text: str) -> None:
        state["done"] = True
        state["sent"] = int(text.split()[1])

    ws = connect(args.url, on_binary=on_binary, on_message=on_message)
    if args.mode == "pygame":
        # Sleeps in pygame.event.wait(); blockws posts an event when a message
        # is pending (blockws.integrations.pygame), the loop then runs update().
        # Set up before the stream starts: SDL's start-up takes a while.
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        import pygame

        from blockws.integrations import pygame as bw_pygame

        pygame.display.init()
        pygame.display.set_mode((16, 16))
        network = bw_pygame.attach(ws)
        pygame.event.clear()
    ws.send(f"{args.rate} 64 {args.seconds}")
    deadline = perf() + args.seconds + 10
    c0, t0 = cpu_seconds(), perf()
    if args.mode == "pump":
        period = 1.0 / args.hz
        tick = perf()
        while not state["done"] and perf() < deadline:
            ws.update()
            tick += period
            delay = tick - perf()
            if delay > 0:
                time.sleep(delay)
            else:
                tick = perf()
    elif args.mode == "pygame":
        while not state["done"] and perf() < deadline:
            if pygame.event.wait(500).type == network:
                ws.update()
        bw_pygame.detach(ws)
        pygame.display.quit()
    else:
        while not state["done"] and perf() < deadline:
            ws.wait(0.5)
            ws.update()
    elapsed, cpu = perf() - t0, cpu_seconds() - c0
    ws.close()
    ws.join(5)
    ws.update()
    us = [x / 1e3 for x in lat]
    return {
        "mode": args.mode,
        "msgs": len(lat),
        "sent": state["sent"],
        "p50_us": pct(us, 0.5),
        "p99_us": pct(us, 0.99),
        "max_us": max(us) if us else float("nan"),
        "client_cpu_pct": 100 * cpu / elapsed,
    }


def child_overrun(args: argparse.Namespace) -> dict[str, Any]:
    import blockws

    iters = args.iters or calibrate(WORK_MS)
    got = [0]
    lags: list[int] = []  # ns from the server's write to the callback
    lag_append = lags.append
    unpack = _stamp.unpack_from
    done: list[int] = []  # messages each stream says it sent

    def on_binary(ws: Any, seg: Any) -> None:
        got[0] += 1
        lag_append(perf_ns() - unpack(seg.data, seg.offset)[0])

    loads = json.loads

    def on_message(ws: Any, text: str) -> None:
        if text.startswith("done "):
            done.append(int(text.split()[1]))
            return
        got[0] += 1  # a JSON state (benchmarks/tls_stream.py): parsed, as a game would
        lag_append(perf_ns() - loads(text)["t"])

    sockets: list[Any] = []
    budget = args.budget_ms / 1e3 if args.budget_ms else None
    seconds = args.frames / FPS + 1.0
    if args.rate > 0:
        for _ in range(args.sockets):
            if args.load == "stream":
                sock = connect(args.url, on_binary=on_binary, on_message=on_message)
            else:  # wss://, permessage-deflate on (the default), HTTP/1.1
                sock = blockws.connect(
                    args.url, timeout=10, on_binary=on_binary, on_message=on_message,
                    ssl_context=ssl.create_default_context(cafile=args.cafile), http2=False,
                )  # fmt: skip
            sockets.append(sock)
        for ws in sockets:
            rate = args.rate / len(sockets)
            if args.load == "json":
                ws.send(f"json {rate} {seconds}")
            elif args.load == "snapshot":
                ws.send(f"snapshot {args.size} {rate} {seconds}")
            else:
                ws.send(f"{rate} 64 {seconds}")
        time.sleep(0.2)  # let the stream settle before the first frame
        while blockws.update_all():  # and start from an empty queue
            pass
        lags.clear()
    ws = sockets[0] if len(sockets) == 1 else None

    def update() -> int:
        if len(sockets) > 1:
            return blockws.update_all(max_time=budget)
        if ws is not None:
            return int(ws.update(max_time=budget))
        return 0

    def wait(timeout: float) -> bool:
        return bool(ws.wait(timeout) if ws is not None else blockws.wait(timeout))

    period = 1.0 / FPS
    frame_ms: list[float] = []
    stolen_ms: list[float] = []
    late_ms: list[float] = []
    per_frame: list[int] = []
    missed = 0
    busy(iters)  # warm up
    c0 = cpu_seconds()
    t0 = perf()
    start = t0
    for i in range(args.frames):
        before = got[0]
        update()
        # Time stolen from the work: wall time beyond this thread's CPU time
        # (waiting for the GIL, or for a CPU the host gave to someone else).
        cpu0, work0 = thread_time(), perf()
        busy(iters)
        end = perf()
        stolen_ms.append(((end - work0) - (thread_time() - cpu0)) * 1e3)
        frame_ms.append((end - start) * 1e3)
        per_frame.append(got[0] - before)
        due = t0 + (i + 1) * period
        if end > due:
            missed += 1
        delay = due - perf()
        if sockets and args.mode == "wait":
            # Idle time spent in ws.wait(): this thread reads the socket itself,
            # so the reader thread stays out of the frames, and what arrives is
            # dispatched now rather than in the next frame's update().
            while delay > 0:
                if wait(delay):
                    update()
                delay = due - perf()
        elif delay > 0:
            time.sleep(delay)
        start = perf()
        late_ms.append(max(0.0, start - due) * 1e3)
    elapsed, cpu = perf() - t0, cpu_seconds() - c0
    framed_lags = len(lags)  # the lag is of messages handled during the frames
    # Everything delivered? Pump until every stream has said how much it sent.
    drain_deadline = perf() + 5.0
    while sockets and len(done) < len(sockets) and perf() < drain_deadline:
        wait(0.05)
        blockws.update_all()
    for sock in sockets:
        sock.abort()
    for sock in sockets:
        sock.join(5)
    blockws.update_all()
    nominal = args.nominal_ms or pct(frame_ms, 0.5)
    over = [f - nominal for f in frame_ms]
    return {
        "rate": args.rate,
        "iters": iters,
        "frames": len(frame_ms),
        "frame_p50_ms": pct(frame_ms, 0.5),
        "frame_p99_ms": pct(frame_ms, 0.99),
        "nominal_ms": nominal,
        "overrun_p50_ms": pct(over, 0.5),
        "overrun_p99_ms": pct(over, 0.99),
        "overrun_max_ms": max(over),
        "wakeup_late_p99_ms": pct(late_ms, 0.99),
        "missed": missed,
        "msgs": got[0],
        "sent": sum(done),
        "stolen_p99_ms": pct(stolen_ms, 0.99),
        "stolen_max_ms": max(stolen_ms),
        "lag_p99_frames": (
            pct([x / 1e9 * FPS for x in lags[:framed_lags]], 0.99) if framed_lags else 0.0
        ),
        "msgs_per_frame_p50": pct([float(x) for x in per_frame], 0.5),
        "client_cpu_pct": 100 * cpu / elapsed,
    }


def child_cost(args: argparse.Namespace) -> dict[str, Any]:
    """The client's CPU per message of the JSON load (wss:// + deflate), with
    no game: the loop sleeps in ``ws.wait()`` and calls ``update()`` when it
    wakes. ``--mode count`` only counts each message; ``--mode loads`` parses
    it with ``json.loads`` too, as the game-loop row's callback does. The CPU
    is the whole process's (reader thread, TLS, inflating, callbacks) from
    the request to the server's ``done``."""
    import blockws

    got = [0]
    done: list[int] = []
    loads = json.loads if args.mode == "loads" else None

    def on_message(ws: Any, text: str) -> None:
        if text.startswith("done "):
            done.append(int(text.split()[1]))
            return
        got[0] += 1
        if loads is not None:
            loads(text)

    ws = blockws.connect(
        args.url, timeout=10, on_message=on_message, http2=False,
        ssl_context=ssl.create_default_context(cafile=args.cafile),
    )  # fmt: skip
    c0, t0 = cpu_seconds(), perf()
    ws.send(f"json {args.rate} {args.seconds}")
    deadline = t0 + args.seconds * 4 + 5
    while not done and perf() < deadline:
        if ws.wait(0.05):
            ws.update()
    cpu, elapsed = cpu_seconds() - c0, perf() - t0
    ws.abort()
    ws.join(5)
    ws.update()
    return {
        "mode": args.mode,
        "rate": args.rate,
        "msgs": got[0],
        "sent": sum(done),
        "us_per_msg": cpu / max(1, got[0]) * 1e6,
        "client_cpu_pct": 100 * cpu / elapsed,
    }


def child(args: argparse.Namespace) -> None:
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    fn = {
        "idle": child_update_idle,
        "latency": child_latency,
        "overrun": child_overrun,
        "cost": child_cost,
    }[args.test]
    result = fn(args)
    result["test"] = args.test
    print(json.dumps(result))


# -- the parent side ----------------------------------------------------------------------


def run_all(
    ws_port: int,
    server_pid: int,
    server_cpu: int,
    client_cpu: int,
    quick: bool = False,
    tiny: bool = False,
    jobs: int = 1,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every game-loop measurement against a running benchmark server.

    ``tiny`` (smoke tests) shrinks every duration to a fraction of a second
    and, with ``jobs`` > 1, runs the children concurrently.
    """
    base = f"ws://127.0.0.1:{ws_port}"
    pin(server_pid, {server_cpu})
    seconds = 0.2 if tiny else 1.0 if quick else 3.0
    frames = 6 if tiny else 60 if quick else 600  # full: 10 s of frames
    calls = 10_000 if tiny else 200_000 if quick else 2_000_000
    common = ["--cpus", str(client_cpu)]
    rows: list[dict[str, Any]] = []
    pool = ThreadPoolExecutor(jobs) if tiny and jobs > 1 else None
    futures: list[Future[dict[str, Any]]] = []

    names: list[str] = []

    def go(name: str, extra: list[str]) -> dict[str, Any]:
        names.append(name)
        if pool is not None:
            futures.append(pool.submit(child_run, name, extra))
            return {}
        return child_run(name, extra)

    def child_run(name: str, extra: list[str]) -> dict[str, Any]:
        try:
            r = run_child("benchmarks.gameloop", [*common, *extra], timeout=60 + seconds * 3)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            r = {"error": str(exc)[-2000:]}
        r["name"] = name
        rows.append(r)
        say(f"gameloop {name}: " + (r["error"].strip().splitlines()[-1] if "error" in r else "ok"))
        return r

    go("update() idle", ["--test", "idle", "--url", base + "/echo", "--calls", str(calls)])
    loops = {
        "pump": "1 kHz pump",
        "wait": "ws.wait()",
        "pygame": "pygame.event.wait()",
        "pygame-alone": "baseline, no socket: pygame.event.wait(), a thread posts",
    }
    for mode in ("pump", "wait", "pygame", "pygame-alone"):
        go(
            f"dispatch latency ({loops[mode]})",
            [
                "--test", "latency", "--mode", mode, "--url", base + "/stream",
                "--rate", "500", "--seconds", str(seconds), "--hz", "1000",
            ],
        )  # fmt: skip
    idle = go("60 Hz, no network", ["--test", "overrun", "--rate", "0", "--frames", str(frames)])
    iters = str(idle.get("iters", 0))
    nominal = str(idle.get("frame_p50_ms", 0.0))
    for rate, mode in ((10_000, "sleep"), (100_000, "sleep"), (10_000, "wait"), (100_000, "wait")):
        go(
            f"60 Hz, {rate // 1000} k msgs/s"
            + (", idle in ws.wait()" if mode == "wait" else ", idle in time.sleep()"),
            [
                "--test", "overrun", "--url", base + "/stream", "--rate", str(rate),
                "--frames", str(frames), "--iters", iters, "--nominal-ms", nominal,
                "--mode", mode,
            ],
        )  # fmt: skip
    # The frame budget (update(max_time=...)), and one update_all() over 8 sockets.
    for sockets, label in (
        (1, "update(max_time=2 ms)"),
        (8, "8 sockets, update_all(max_time=2 ms)"),
    ):
        go(
            f"60 Hz, 100 k msgs/s, {label}, idle in wait()",
            [
                "--test", "overrun", "--url", base + "/stream", "--rate", "100000",
                "--frames", str(frames), "--iters", iters, "--nominal-ms", nominal,
                "--mode", "wait", "--sockets", str(sockets), "--budget-ms", "2",
            ],
        )  # fmt: skip
    # The loads a real game brings: wss:// with permessage-deflate, from
    # benchmarks/tls_stream.py (its own process, on the server CPU).
    tls_port = free_port()
    with tempfile.TemporaryDirectory(prefix="blockws-bench-tls-") as certdir:
        cmd = [sys.executable, "-m", "benchmarks.tls_stream", str(tls_port), certdir]
        with server(cmd, tls_port) as tls_proc:
            pin(tls_proc.pid, {server_cpu})
            tls = [
                "--test", "overrun", "--url", f"wss://127.0.0.1:{tls_port}/",
                "--cafile", os.path.join(certdir, "ca.pem"), "--frames", str(frames),
                "--iters", iters, "--nominal-ms", nominal, "--mode", "wait", "--budget-ms", "2",
            ]  # fmt: skip
            go(
                "60 Hz, wss:// + deflate, 100 k msgs/s of ~64 B JSON, update(max_time=2 ms)",
                [*tls, "--load", "json", "--rate", "100000"],
            )
            # What the JSON row costs without a game: blockws alone (a
            # counting callback), then with the row's json.loads.
            for mode, label in (("count", "a counting callback"), ("loads", "json.loads")):
                go(
                    f"CPU per message, wss:// + deflate, ~64 B JSON, {label}",
                    [
                        "--test", "cost", "--url", f"wss://127.0.0.1:{tls_port}/",
                        "--cafile", os.path.join(certdir, "ca.pem"), "--mode", mode,
                        "--rate", "100000", "--seconds", str(seconds),
                    ],
                )  # fmt: skip
            go(
                "60 Hz, wss:// + deflate, a 256 KiB snapshot 60 times a second, "
                "update(max_time=2 ms)",
                [*tls, "--load", "snapshot", "--size", str(256 * 1024), "--rate", "60"],
            )
            if pool is not None:  # the server must outlive the children
                for future in list(futures):
                    future.result()
    if pool is not None:
        for future in futures:
            future.result()
        pool.shutdown()
        rows.sort(key=lambda r: names.index(r["name"]))
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    by_test: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_test.setdefault(r.get("test", "error"), []).append(r)
    out = ["## Game-loop fitness (blockws-cb)", ""]
    for r in by_test.get("idle", []):
        out.append(
            f"`ws.update()` with nothing pending: **{r['update_ns']:.0f} ns** per call "
            f"(target < 1000 ns: {'yes' if r['update_ns'] < 1000 else '**no**'}); "
            f"`blockws.update_all()` with one socket: {r['update_all_ns']:.0f} ns; "
            f"baselines: calling a trivial function {r['call_trivial_ns']:.0f} ns, "
            f"testing an empty deque {r['deque_check_ns']:.0f} ns (loop included in each)."
        )
    lat = by_test.get("latency", [])
    if lat:
        out += [
            "",
            "Dispatch latency, server write to callback (500 msgs/s of 64 B):",
            "",
            table(
                lat,
                [
                    ("name", "loop", "s"),
                    ("p50_us", "p50 us", ".0f"),
                    ("p99_us", "p99 us", ".0f"),
                    ("max_us", "max us", ".0f"),
                    ("msgs", "msgs", "d"),
                    ("client_cpu_pct", "client CPU %", ".1f"),
                ],
            ),
        ]
    over = by_test.get("overrun", [])
    if over:
        for r in over:
            if r["rate"] == 10_000:
                r["target"] = "yes" if r["overrun_p99_ms"] < 1.0 else "**no**"
        out += [
            "",
            f"Frame-time overrun, 60 Hz loop with {WORK_MS:.0f} ms of CPU work per frame "
            "(target: p99 < 1 ms at 10 k msgs/s):",
            "",
            table(
                over,
                [
                    ("name", "loop", "s"),
                    ("frame_p50_ms", "frame p50 ms", ".2f"),
                    ("overrun_p50_ms", "overrun p50 ms", ".2f"),
                    ("overrun_p99_ms", "overrun p99 ms", ".2f"),
                    ("target", "target met", "s"),
                    ("missed", "missed frames", "d"),
                    ("stolen_p99_ms", "stolen p99 ms", ".2f"),
                    ("lag_p99_frames", "lag p99 frames", ".2f"),
                    ("sent", "msgs sent", "d"),
                    ("wakeup_late_p99_ms", "wake-up late p99 ms", ".2f"),
                    ("msgs_per_frame_p50", "msgs/frame", ".0f"),
                    ("msgs", "msgs", "d"),
                    ("frames", "frames", "d"),
                    ("client_cpu_pct", "client CPU %", ".0f"),
                ],
            ),
        ]
    cost = by_test.get("cost", [])
    if cost:
        # What a 60 Hz game with WORK_MS of work a frame leaves the messages.
        left = (1 - WORK_MS * FPS / 1e3) * 1e6 / cost[0]["rate"]
        out += [
            "",
            f"CPU per message of the JSON load, no game (a loop in `ws.wait()`): the game "
            f"row's {WORK_MS:.0f} ms a frame at {FPS:.0f} Hz leaves one CPU {left:.2f} us "
            f"a message at {cost[0]['rate'] // 1000} k msgs/s:",
            "",
            table(
                cost,
                [
                    ("name", "load", "s"),
                    ("us_per_msg", "client CPU us/msg", ".2f"),
                    ("msgs", "msgs", "d"),
                    ("sent", "msgs sent", "d"),
                    ("client_cpu_pct", "client CPU %", ".0f"),
                ],
            ),
        ]
    for r in by_test.get("error", []):
        out.append(f"\n- {r['name']} failed: {r['error'].strip().splitlines()[-1]}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gameloop")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--test", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--cpus", help=argparse.SUPPRESS)
    ap.add_argument("--calls", type=int, default=1_000_000, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="pump", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=2.0, help=argparse.SUPPRESS)
    ap.add_argument("--hz", type=float, default=1000.0, help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, default=120, help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--nominal-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--sockets", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--budget-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--load", default="stream", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--cafile", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return
    cpus = sorted(os.sched_getaffinity(0))
    ws_port, tcp_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "benchmarks.server", str(ws_port), str(tcp_port)]
    with tempfile.NamedTemporaryFile(prefix="blockws-bench-server-", suffix=".log") as errlog:
        with server(cmd, ws_port, log=errlog.name) as proc:
            rows = run_all(ws_port, proc.pid, cpus[0], cpus[-1], quick=args.quick)
    print(report(rows))


if __name__ == "__main__":
    main()
