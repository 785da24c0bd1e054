"""The client side of one measurement: runs in a fresh interpreter and prints one JSON line.

    python -m benchmarks --child --client NAME --workload W1 --ws-port P --tcp-port Q ...

Every client does the same work the same way, as its users would write it:

* threaded clients (blockws' ``receive()``, websocket-client, websockets'
  sync client) share the loops in this module through three calls: send a
  text, send bytes, receive one message (``str`` or ``bytes``);
* ``blockws-cb`` registers ``on_message``/``on_binary`` and pumps them with
  ``while ...: ws.wait(); ws.update()``;
* ``picows`` runs on asyncio with a ``WSListener``; sends happen on the
  loop's thread (picows requires it), so W2's "writer" is a task that yields
  every 256 messages and honours ``pause_writing``;
* ``probe`` sends pre-built masked frames on a raw socket and only counts the
  bytes that come back: no parsing, no message objects. It is the fastest a
  Python client can drive the server, so the server has headroom as long as
  the probe beats every real client;
* ``tcp`` moves the same payload bytes over plain TCP, without WebSocket
  framing or masking and with no per-message work, the way the probe does:
  one round trip at a time (W1), 4 x 1 MiB in flight (W3), 64 KiB writes of
  pre-joined payloads (W2, W5), big ``recv_into`` calls. It is the ceiling:
  the kernel, the loopback and one Python thread moving the bytes.

Received text is a ``str`` for every client. Received binary is a ``bytes``
object for the threaded clients; blockws' callbacks and picows hand out a
view of their buffer (``BufferSegment``, ``WSFrame``), which is their natural
zero-copy use, and the loops here only take its length.

Long runs stop early at ``--budget`` seconds (``capped``): a rate measured
over the first few seconds of a steady stream is the same rate, and the full
run stays within minutes. The JSON says how many operations were done.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import resource
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

from . import builds
from ._harness import cpu_seconds, proc_cpu
from .workloads import WORKLOADS, Workload

perf = time.perf_counter
perf_ns = time.perf_counter_ns

#: Messages a flood request asks the server for (W4); two are kept outstanding.
FLOOD_BATCH = 16_384
TIMEOUT = 60.0  # any single blocking wait in a child


class Params:
    """What one child measures."""

    def __init__(self, args: Any) -> None:
        self.client: str = args.client
        self.workload: Workload = WORKLOADS[args.workload]
        self.count: int = args.count
        self.size: int = self.workload.size
        self.window: int = self.workload.window
        self.ws_url = f"ws://127.0.0.1:{args.ws_port}{self.workload.path}"
        self.ws_port: int = args.ws_port
        self.tcp_port: int = args.tcp_port
        # the port whose TCP segments are counted (Meter): the plain-TCP twin's for ``tcp``
        self.seg_port = self.tcp_port if self.client == "tcp" else self.ws_port
        self.budget: float = args.budget if self.workload.capped else 1e9
        self.server_pid: int | None = args.server_pid
        self.stop = 0.0  # perf() deadline, set by Meter.start

    def text(self, tag: str = "x") -> str:
        return (tag * self.size)[: self.size]

    def payload(self) -> bytes:
        return os.urandom(self.size)


# struct tcp_info (linux/tcp.h): tcpi_data_segs_in and tcpi_data_segs_out, two __u32 at
# byte offsets 152 and 156 (Linux 4.6 and later); data segments only, ACKs not counted.
_TCPI_DATA_SEGS = struct.Struct("=II")
_TCPI_DATA_SEGS_AT = 152


def tcp_data_segments(port: int) -> tuple[int, int]:
    """(data segments received, sent) so far on this process's TCP sockets to ``port``.

    Found through ``/proc/self/fd`` and read with ``getsockopt(TCP_INFO)`` on a
    duplicate of each descriptor, so it needs nothing from the client library. On
    the loopback, messages per segment tell whether the sender's small writes were
    coalesced (one segment for many messages) or went out one segment per write,
    which costs both ends a trip through the TCP stack each (see benchmarks/README.md).
    (0, 0) where the kernel does not report them.
    """
    segs_in = segs_out = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0, 0
    for name in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            dup = os.dup(int(name))
        except OSError:
            continue
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        with s:
            try:
                if s.type != socket.SOCK_STREAM or s.getpeername()[1] != port:
                    continue
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            except (OSError, IndexError, TypeError):
                continue
            if len(info) >= _TCPI_DATA_SEGS_AT + _TCPI_DATA_SEGS.size:
                a, b = _TCPI_DATA_SEGS.unpack_from(info, _TCPI_DATA_SEGS_AT)
                segs_in += a
                segs_out += b
    return segs_in, segs_out


class Meter:
    """Wall time, this process's CPU and the server's CPU over the measured interval."""

    def __init__(self, p: Params) -> None:
        self.p = p
        self.t0 = self.c0 = self.s0 = 0.0
        self.segs0 = (0, 0)
        self.quick = False
        #: the class of the transport under the connection, where the client shows it
        #: (picows: aiofastnet's or asyncio's); read by ``builds.probe``
        self.transport_type: type | None = None
        #: anything else a client says about its build (``builds.probe`` adds it)
        self.details: dict[str, str] = {}
        self.result: dict[str, Any] = {}
        self.opened: tuple[float, float, float, dict[str, int]] = (0.0, 0.0, 0.0, {})

    def _server_cpu(self) -> float:
        pid = self.p.server_pid
        return proc_cpu(pid) if pid else 0.0

    def start(self, quick: bool = False) -> None:
        """Start the clock; ``quick``: without a garbage collection and segment counts
        first (W8 starts inside its frame loop, where neither may stall a frame)."""
        self.quick = quick
        if not quick:
            gc.collect()
            self.segs0 = tcp_data_segments(self.p.seg_port)
        self.s0 = self._server_cpu()
        self.c0 = cpu_seconds()
        self.t0 = perf()
        self.p.stop = self.t0 + self.p.budget

    def stop(self, ops: int, nbytes: int = 0, **extra: Any) -> None:
        elapsed = perf() - self.t0
        cpu = cpu_seconds() - self.c0
        server = self._server_cpu() - self.s0
        segs_in, segs_out = (0, 0) if self.quick else tcp_data_segments(self.p.seg_port)
        self.result.update(
            ops=ops,
            bytes=nbytes,
            elapsed=elapsed,
            cpu=cpu,
            server_cpu=server,
            segs_in=segs_in - self.segs0[0],
            segs_out=segs_out - self.segs0[1],
            **extra,
        )

    def mark_open(self) -> None:
        """W7: the opening phase ends here (its figures are the measurement's)."""
        self.opened = (perf(), cpu_seconds(), self._server_cpu(), proc_status())

    def stop_open_close(self, conns: int, base: dict[str, int]) -> None:
        """W7: rates, CPU and RSS of the opening phase; the closing time beside them."""
        t, cpu, server, status = self.opened
        self.result.update(
            ops=conns,
            bytes=0,
            elapsed=t - self.t0,
            cpu=cpu - self.c0,
            server_cpu=server - self.s0,
            open_s=t - self.t0,
            close_s=perf() - t,
            rss_open_kb=status["VmRSS"],
            rss_base_kb=base["VmRSS"],
            threads_open=status["Threads"],
            threads_base=base["Threads"],
        )


def percentiles_us(lat_ns: list[int]) -> dict[str, float]:
    if not lat_ns:
        return {}
    s = sorted(lat_ns)
    n = len(s)
    return {
        "p50_us": s[n // 2] / 1e3,
        "p99_us": s[min(n - 1, (n * 99) // 100)] / 1e3,
    }


def proc_status() -> dict[str, int]:
    """VmRSS (kB) and native thread count of this process."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "Threads:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


# -- the loops shared by threaded clients ----------------------------------------------

Send = Callable[[Any], Any]
Recv = Callable[[], Any]


def loop_w1(m: Meter, send_text: Send, recv: Recv) -> None:
    p = m.p
    msg = p.text()
    lat: list[int] = []
    m.start()
    for i in range(p.count):
        t = perf_ns()
        send_text(msg)
        recv()
        lat.append(perf_ns() - t)
        if i & 63 == 63 and perf() > p.stop:
            break
    m.stop(len(lat), len(lat) * p.size, **percentiles_us(lat))


def loop_w2(m: Meter, send_text: Send, recv: Recv) -> None:
    p = m.p
    msg, end = p.text("x"), p.text("~")

    def writer() -> None:
        stop = p.stop
        for i in range(p.count - 1):
            send_text(msg)
            if i & 255 == 255 and perf() > stop:
                break
        send_text(end)

    thread = threading.Thread(target=writer, name="bench-writer")
    got = 0
    m.start()
    thread.start()
    while True:
        got += 1
        if recv() == end:
            break
    m.stop(got, got * p.size)
    thread.join()


def loop_w3(m: Meter, send_bin: Send, recv: Recv) -> None:
    p = m.p
    payload = p.payload()
    sent = got = 0
    m.start()
    for _ in range(min(p.window, p.count)):
        send_bin(payload)
        sent += 1
    while got < sent:
        data = recv()
        got += 1
        if len(data) != p.size:
            raise RuntimeError(f"echo of {len(data)} bytes, expected {p.size}")
        if sent < p.count and perf() < p.stop:
            send_bin(payload)
            sent += 1
    m.stop(got, got * p.size)


def loop_w4(m: Meter, send_text: Send, recv: Recv) -> None:
    p = m.p
    n, batch = p.count, FLOOD_BATCH
    requested = 0

    def request() -> None:
        nonlocal requested
        k = min(batch, n - requested)
        send_text(f"{k} {p.size}")
        requested += k

    got = 0
    m.start()
    request()
    if requested < n:
        request()
    while got < requested:
        recv()
        got += 1
        if got % batch == 0 and requested < n and perf() < p.stop:
            request()
    m.stop(got, got * p.size)


def loop_w5(m: Meter, send_bin: Send, send_text: Send, recv: Recv) -> None:
    p = m.p
    payload = p.payload()
    sent = 0
    check = 255 if p.size < 4096 else 0
    m.start()
    stop = p.stop
    for i in range(p.count):
        send_bin(payload)
        if i & check == check and perf() > stop:
            sent = i + 1
            break
    else:
        sent = p.count
    send_text("count")
    reply = recv()
    m.stop(sent, sent * p.size)
    count = int(reply.split()[0])
    if count != sent:
        raise RuntimeError(f"the sink counted {count} messages, {sent} were sent")


def run_threaded(m: Meter, send_text: Send, send_bin: Send, recv: Recv) -> None:
    w = m.p.workload.name
    if w == "W1":
        loop_w1(m, send_text, recv)
    elif w == "W2":
        loop_w2(m, send_text, recv)
    elif w == "W3":
        loop_w3(m, send_bin, recv)
    elif w == "W4":
        loop_w4(m, send_text, recv)
    elif w in ("W5", "W5b"):
        loop_w5(m, send_bin, send_text, recv)
    else:
        raise ValueError(w)


def open_close(
    m: Meter, open_all: Callable[[int], list[Any]], close_all: Callable[[list[Any]], None]
) -> None:
    """W7: open :func:`w7_warm_count` idle connections first, kept open and not
    counted; note RSS and threads; open ``count`` more and note them again;
    close the measured ones (timed), then the warm-up ones.

    The warm-up batch absorbs the one-off costs of a first connection (lazy
    imports, caches filled on first use) and the heap the process had freed
    before (compiling modules that have no bytecode cache frees megabytes,
    which the first connections then reuse without growing RSS). It is as
    large as the measured batch: with a fifth of it, blockws read 28 kB per
    connection without its ``.pyc`` files and 31 kB with them, and picows
    32.3 kB; with a whole batch, 30.3-31.2 kB either way and picows 28.1 kB,
    and the same at twice the count. What is measured is what each further
    idle connection adds, the same way for every client.
    """
    warm = open_all(w7_warm_count(m.p.count))
    base = proc_status()
    m.start()
    conns = open_all(m.p.count)
    m.mark_open()
    close_all(conns)
    m.stop_open_close(len(conns), base)
    close_all(warm)


def w7_warm_count(count: int) -> int:
    """W7's warm-up batch: as many connections as are measured (at least one)."""
    return max(1, count)


# -- blockws -----------------------------------------------------------------------------


def blockws_options() -> dict[str, Any]:
    # No compression for anyone: the server does not offer it and it is not what is measured.
    return {"extensions": []}


def run_blockws_recv(m: Meter) -> None:
    import blockws

    p = m.p
    if p.workload.name == "W7":

        def open_all(n: int) -> list[Any]:
            return [blockws.connect(p.ws_url, timeout=30, **blockws_options()) for _ in range(n)]

        def close_all(conns: list[Any]) -> None:
            for ws in conns:
                ws.close()
            for ws in conns:
                ws.join(10)
                ws.update()

        open_close(m, open_all, close_all)
        return
    ws = blockws.connect(p.ws_url, timeout=10, **blockws_options())
    receive = ws.receive

    def recv() -> Any:
        return receive(TIMEOUT)

    run_threaded(m, ws.send, ws.send, recv)
    if p.workload.name == "W4":
        ws.abort()
    else:
        ws.close()
    ws.join(10)
    ws.update()


def _pump(ws: Any, done: Callable[[], bool]) -> None:
    """The callback loop: ``ws.wait(); ws.update()`` until ``done()``.

    The harness's own checks (the deadline, a closed socket) run after a wait
    that found nothing pending and every 256 turns, not on every turn: a
    round trip of W1 is a turn, and picows' loop pays for no such check per
    message either (its deadline is a timer of the event loop)."""
    deadline = perf() + TIMEOUT
    wait, update = ws.wait, ws.update
    turns = 0
    while not done():
        idle = not wait(1.0)
        update()
        turns += 1
        if idle or not turns & 255:
            if perf() > deadline:
                raise TimeoutError("no progress")
            if ws.closed:
                raise RuntimeError(f"socket closed: {ws.close_code} {ws.error!r}")


#: W8: messages per second each socket receives, frames per second of the loop.
PULSE_RATE = 10.0
FRAME_HZ = 60.0
WARMUP_FRAMES = 60
STALL_CAP = 10.0  # seconds past the window's end after which the server stops W8's streams


def idle_update_all_us(update_all: Callable[[], Any], calls: int = 1000, batches: int = 7) -> float:
    """Median over ``batches`` of the mean cost of ``update_all()`` with nothing pending (us)."""
    out = []
    for _ in range(batches):
        t = perf_ns()
        for _ in range(calls):
            update_all()
        out.append((perf_ns() - t) / calls / 1e3)
    out.sort()
    return out[len(out) // 2]


def run_pulse_frames(m: Meter) -> None:
    """W8: ``count`` sockets, each sent PULSE_RATE msgs/s by ``/pulse``, pumped at 60 Hz.

    One thread runs a 60 Hz frame loop that calls ``blockws.update_all()`` once
    per frame (no arguments) and sleeps until the next frame. After a warm-up
    second, the measured window records: messages delivered to ``on_binary``,
    the process's CPU (every thread: the sockets' readers too) per message, the
    duration of each ``update_all()`` (p50/p99/max), and each message's delay
    from the server's write to its callback. Then ``"stop"`` ends every
    stream; once each socket has had its ``"done N"`` text, ``update_all()``
    with nothing pending is timed at this socket count (and was timed before
    any socket was opened). ``before_window``: messages delivered during the
    warm-up frames.
    """
    import blockws

    p = m.p
    n, size = p.count, max(8, p.size)
    window = min(4.0, max(0.5, 2 * p.budget))
    warmup = WARMUP_FRAMES / FRAME_HZ
    frame = 1.0 / FRAME_HZ
    update_all = blockws.update_all
    idle_before = idle_update_all_us(update_all)

    st = {"open": 0, "closed": 0, "done": 0, "got": 0, "all": 0, "server_sent": 0}
    st["counting"] = False
    lat: list[int] = []
    unpack = struct.Struct("!Q").unpack_from

    def on_open(ws: Any) -> None:
        st["open"] += 1

    def on_closed(ws: Any, code: int, reason: str) -> None:
        st["closed"] += 1

    def on_binary(ws: Any, seg: Any) -> None:
        st["all"] += 1
        if st["counting"]:
            st["got"] += 1
            lat.append(perf_ns() - unpack(seg.data, seg.offset)[0])

    def on_message(ws: Any, text: str) -> None:
        if text.startswith("done"):
            st["done"] += 1
            st["server_sent"] += int(text.split()[1])

    def pump_until(key: str, goal: int, limit: float, strict: bool = True) -> None:
        deadline = perf() + limit
        while st[key] < goal:
            blockws.wait(0.1)
            update_all()
            if perf() > deadline:
                if not strict:
                    return
                raise TimeoutError(f"{st[key]} of {goal} sockets {key}")

    base = proc_status()
    t_open = perf()
    url = f"{p.ws_url}?{os.getpid()}"  # this child's group of /pulse sockets
    conns = [
        blockws.WebSocket(
            url,
            on_open=on_open,
            on_closed=on_closed,
            on_binary=on_binary,
            on_message=on_message,
            **blockws_options(),
        ).open()
        for _ in range(n)
    ]
    # Sockets that did not open in time (or failed) are reported, not waited for.
    pump_until("open", n, TIMEOUT / 2 + n / 100, strict=False)
    open_s = perf() - t_open
    n_open = st["open"]
    if n_open == 0:
        raise RuntimeError(f"none of {n} sockets opened in {open_s:.0f} s")
    opened = proc_status()
    # A raw control connection of the same group starts every stream with one
    # message and stops them with another, independently of the sockets under
    # test. The window is counted in frames (WARMUP_FRAMES, then the window's), so
    # a frame that takes seconds shows in the figures instead of ending the window
    # before it began. The server ends the streams by itself STALL_CAP seconds
    # after the window's nominal end: an update_all() that keeps draining messages
    # that keep arriving (a stalled loop) then returns, and the loop reports it.
    control, _ = raw_handshake(p.ws_port, f"{p.workload.path}?{os.getpid()}")
    window_frames = int(window * FRAME_HZ)
    seconds = warmup + window + STALL_CAP
    start = perf()
    control.sendall(masked_frame(1, f"start {PULSE_RATE} {size} {seconds}".encode()))
    cap = stream_end = start + seconds

    frames_ns: list[int] = []
    late = 0
    next_frame = start
    got_before = 0
    frame_no = 0
    # Counted from the first frame, and again from the end of the warm-up: a loop
    # that stalls during the warm-up reports its frames from the start.
    st["counting"] = True
    m.start(quick=True)
    stalled = False
    while True:
        if frame_no == WARMUP_FRAMES:
            got_before = st["all"]
            st["got"] = 0
            lat.clear()
            frames_ns.clear()
            late = 0
            m.start(quick=True)
        if frame_no == WARMUP_FRAMES + window_frames:
            break
        if perf() > cap:
            stalled = True
            break
        t = perf_ns()
        update_all()
        frames_ns.append(perf_ns() - t)
        frame_no += 1
        next_frame += frame
        delay = next_frame - perf()
        if delay > 0:
            time.sleep(delay)
        else:
            late += 1
            next_frame = perf()
    st["counting"] = False
    m.stop(st["got"], st["got"] * size)
    window = m.result["elapsed"]
    # the time the server streamed within the window
    streamed = max(0.0, min(m.t0 + window, stream_end) - m.t0)
    control.sendall(masked_frame(1, b"stop"))
    pump_until("done", n_open, TIMEOUT, strict=False)
    done = st["done"]
    update_all()
    control.close()
    idle = idle_update_all_us(update_all)
    single: list[int] = []
    for _ in range(2000):
        t = perf_ns()
        update_all()
        single.append(perf_ns() - t)
    single.sort()
    for ws in conns:
        ws.close()
    pump_until("closed", n, TIMEOUT + n / 50, strict=False)
    frames_ns.sort()
    k = len(frames_ns)
    m.result.update(
        sockets=n,
        sockets_open=n_open,
        streams_done=done,
        sockets_closed=st["closed"],
        rate_per_socket=PULSE_RATE,
        window_s=window,
        expected=int(n_open * PULSE_RATE * streamed),
        server_sent=st["server_sent"],
        frames=k,
        late_frames=late,
        frame_p50_us=frames_ns[k // 2] / 1e3 if k else None,
        frame_p99_us=frames_ns[min(k - 1, (k * 99) // 100)] / 1e3 if k else None,
        frame_max_us=frames_ns[-1] / 1e3 if k else None,
        idle_update_all_us=idle,
        idle_update_all_p99_us=single[(len(single) * 99) // 100] / 1e3,
        idle_update_all_us_no_sockets=idle_before,
        open_s=open_s,
        before_window=got_before,
        stalled=stalled,
        warmed_up=frame_no > WARMUP_FRAMES,
        rss_open_kb=opened["VmRSS"],
        rss_base_kb=base["VmRSS"],
        threads_open=opened["Threads"],
        threads_base=base["Threads"],
        **{("lat_" + k_): v for k_, v in percentiles_us(lat).items()},
    )


def run_blockws_cb(m: Meter) -> None:
    import blockws

    p = m.p
    w = p.workload.name
    if w == "W8":
        run_pulse_frames(m)
        return
    if w == "W7":
        state = {"open": 0, "closed": 0}

        def on_open(ws: Any) -> None:
            state["open"] += 1

        def on_closed(ws: Any, code: int, reason: str) -> None:
            state["closed"] += 1

        def pump_all(key: str, n: int, start: int) -> None:
            deadline = perf() + TIMEOUT
            while state[key] - start < n:
                blockws.wait(1.0)
                blockws.update_all()
                if perf() > deadline:
                    raise TimeoutError(f"{state[key] - start} of {n} sockets {key}")

        def open_all(n: int) -> list[Any]:
            start = state["open"]
            conns = [
                blockws.WebSocket(
                    p.ws_url, on_open=on_open, on_closed=on_closed, **blockws_options()
                ).open()
                for _ in range(n)
            ]
            pump_all("open", n, start)
            return conns

        def close_all(conns: list[Any]) -> None:
            start = state["closed"]
            for ws in conns:
                ws.close()
            pump_all("closed", len(conns), start)

        open_close(m, open_all, close_all)
        return

    count, size = p.count, p.size
    ws: Any = None
    st: dict[str, Any] = {"got": 0, "done": False}
    lat: list[int] = []

    if w == "W1":
        msg = p.text()
        sent_at = [0]

        def on_message(ws: Any, text: str) -> None:
            now = perf_ns()
            lat.append(now - sent_at[0])
            n = len(lat)
            if n >= count or (n & 63 == 0 and perf() > p.stop):
                st["done"] = True
            else:
                sent_at[0] = now
                ws.send(msg)

        ws = blockws.connect(p.ws_url, timeout=10, on_message=on_message, **blockws_options())
        m.start()
        sent_at[0] = perf_ns()
        ws.send(msg)
        _pump(ws, lambda: st["done"])
        m.stop(len(lat), len(lat) * size, **percentiles_us(lat))

    elif w == "W2":
        msg, end = p.text("x"), p.text("~")

        def on_message(ws: Any, text: str) -> None:
            st["got"] += 1
            if text == end:
                st["done"] = True

        ws = blockws.connect(p.ws_url, timeout=10, on_message=on_message, **blockws_options())

        def writer() -> None:
            send, stop = ws.send, p.stop
            for i in range(count - 1):
                send(msg)
                if i & 255 == 255 and perf() > stop:
                    break
            send(end)

        thread = threading.Thread(target=writer, name="bench-writer")
        m.start()
        thread.start()
        _pump(ws, lambda: st["done"])
        m.stop(st["got"], st["got"] * size)
        thread.join()

    elif w == "W3":
        payload = p.payload()

        def on_binary(ws: Any, segment: Any) -> None:
            st["got"] += 1
            if len(segment) != size:
                raise RuntimeError(f"echo of {len(segment)} bytes")
            if st["sent"] < count and perf() < p.stop:
                ws.send(payload)
                st["sent"] += 1

        ws = blockws.connect(p.ws_url, timeout=10, on_binary=on_binary, **blockws_options())
        m.start()
        st["sent"] = 0
        for _ in range(min(p.window, count)):
            ws.send(payload)
            st["sent"] += 1
        _pump(ws, lambda: st["got"] >= st["sent"])
        m.stop(st["got"], st["got"] * size)

    elif w == "W4":
        st["requested"] = 0

        def request(ws: Any) -> None:
            k = min(FLOOD_BATCH, count - st["requested"])
            ws.send(f"{k} {size}")
            st["requested"] += k

        def on_binary(ws: Any, segment: Any) -> None:
            got = st["got"] = st["got"] + 1
            if got % FLOOD_BATCH == 0 and st["requested"] < count and perf() < p.stop:
                request(ws)

        ws = blockws.connect(p.ws_url, timeout=10, on_binary=on_binary, **blockws_options())
        m.start()
        request(ws)
        if st["requested"] < count:
            request(ws)
        _pump(ws, lambda: st["got"] >= st["requested"])
        m.stop(st["got"], st["got"] * size)

    elif w in ("W5", "W5b"):
        payload = p.payload()

        def on_message(ws: Any, text: str) -> None:
            st["reply"] = text
            st["done"] = True

        ws = blockws.connect(p.ws_url, timeout=10, on_message=on_message, **blockws_options())
        check = 255 if size < 4096 else 0
        m.start()
        send, stop = ws.send, p.stop
        sent = count
        for i in range(count):
            send(payload)
            if i & check == check and perf() > stop:
                sent = i + 1
                break
        send("count")
        _pump(ws, lambda: st["done"])
        m.stop(sent, sent * size)
        if int(st["reply"].split()[0]) != sent:
            raise RuntimeError(f"the sink counted {st['reply']}, {sent} were sent")
    else:
        raise ValueError(w)

    if w == "W4":
        ws.abort()
    else:
        ws.close()
    ws.join(10)
    ws.update()


# -- websocket-client ----------------------------------------------------------------------


class _BlockModule:
    """A meta path finder that makes ``import NAME`` fail (websocket-client without wsaccel)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ImportError(f"{fullname} is blocked for this measurement")
        return None


def run_websocket_client(m: Meter) -> None:
    if os.environ.get("BENCH_NO_WSACCEL"):
        sys.meta_path.insert(0, _BlockModule("wsaccel"))
    import websocket

    p = m.p
    m.result["wsaccel"] = "wsaccel" in sys.modules

    def connect() -> Any:
        return websocket.create_connection(p.ws_url, timeout=TIMEOUT)

    if p.workload.name == "W7":

        def close_all(conns: list[Any]) -> None:
            for ws in conns:
                ws.close()

        open_close(m, lambda n: [connect() for _ in range(n)], close_all)
        return
    ws = connect()

    def send_bin(data: bytes) -> None:
        ws.send_bytes(data)

    run_threaded(m, ws.send, send_bin, ws.recv)
    if p.workload.name == "W4":
        ws.shutdown()
    else:
        ws.close()


# -- websockets (sync client) --------------------------------------------------------------


def run_websockets(m: Meter) -> None:
    from websockets.sync.client import connect as ws_connect

    p = m.p

    def connect() -> Any:
        return ws_connect(p.ws_url, compression=None, max_size=None, open_timeout=30)

    with contextlib.ExitStack() as stack:
        if p.workload.name == "W7":

            def close_all(conns: list[Any]) -> None:
                for ws in conns:
                    ws.close()

            open_close(m, lambda n: [stack.enter_context(connect()) for _ in range(n)], close_all)
            return
        ws = stack.enter_context(connect())

        def recv() -> Any:
            return ws.recv(TIMEOUT)

        run_threaded(m, ws.send, ws.send, recv)
        if p.workload.name == "W4":
            ws.socket.shutdown(socket.SHUT_RDWR)


# -- picows (asyncio) ----------------------------------------------------------------------


def run_picows(m: Meter) -> None:
    import asyncio

    from picows import WSListener, WSMsgType, ws_connect

    p = m.p
    w = p.workload.name
    TEXT, BINARY = WSMsgType.TEXT, WSMsgType.BINARY
    count, size = p.count, p.size

    class Listener(WSListener):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.on_frame: Callable[[Any, Any], None] = lambda t, f: None
            self.paused = False
            self.resumed: asyncio.Event | None = None
            self.done: asyncio.Future[Any] | None = None

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            self.on_frame(transport, frame)

        def pause_writing(self) -> None:
            self.paused = True

        def resume_writing(self) -> None:
            self.paused = False
            if self.resumed is not None:
                self.resumed.set()

        async def drain(self) -> None:
            if self.paused:
                self.resumed = asyncio.Event()
                await self.resumed.wait()

    # picows logs its masking implementation (SIMD or not) once per connection, at
    # INFO: listen for the first such line, then stop listening (builds.probe).
    plog = logging.getLogger("picows.client")

    class MaskImpl(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"mask_impl=(\w+)", record.getMessage())
            if found:
                m.details["picows mask_impl"] = found.group(1)
                plog.removeHandler(self)
                plog.setLevel(logging.WARNING)

    plog.addHandler(MaskImpl())
    plog.setLevel(logging.INFO)
    plog.propagate = False

    async def connect() -> tuple[Any, Listener]:
        return await ws_connect(  # type: ignore[no-any-return]
            Listener,
            p.ws_url,
            max_frame_size=64 * 1024 * 1024,
            use_aiofastnet=os.environ.get("BENCH_PICOWS_AIOFASTNET", "1") != "0",
        )

    async def close(t: Any) -> None:
        t.send_close()
        t.disconnect()
        await asyncio.wait_for(t.wait_disconnected(), 10)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if w == "W7":  # as open_close() does
            warm = await asyncio.gather(*[connect() for _ in range(w7_warm_count(count))])
            base = proc_status()
            m.start()
            pairs = await asyncio.gather(*[connect() for _ in range(count)])
            m.mark_open()
            if pairs:
                m.transport_type = type(pairs[0][0].underlying_transport)
            await asyncio.gather(*[close(t) for t, _ in pairs])
            m.stop_open_close(len(pairs), base)
            await asyncio.gather(*[close(t) for t, _ in warm])
            return

        t, lst = await connect()
        m.transport_type = type(t.underlying_transport)
        done: asyncio.Future[Any] = loop.create_future()
        st: dict[str, Any] = {"got": 0, "sent": 0, "requested": 0}
        lat: list[int] = []

        if w == "W1":
            msg = p.text().encode()
            sent_at = [0]

            def on_frame(t: Any, frame: Any) -> None:
                now = perf_ns()
                frame.get_payload_as_utf8_text()
                lat.append(now - sent_at[0])
                n = len(lat)
                if n >= count or (n & 63 == 0 and perf() > p.stop):
                    done.set_result(None)
                else:
                    sent_at[0] = now
                    t.send(TEXT, msg)

            lst.on_frame = on_frame
            m.start()
            sent_at[0] = perf_ns()
            t.send(TEXT, msg)
            await asyncio.wait_for(done, TIMEOUT)
            m.stop(len(lat), len(lat) * size, **percentiles_us(lat))

        elif w == "W2":
            msg, end = p.text("x").encode(), p.text("~")

            def on_frame(t: Any, frame: Any) -> None:
                st["got"] += 1
                if frame.get_payload_as_utf8_text() == end and not done.done():
                    done.set_result(None)

            async def writer() -> None:
                stop = p.stop
                for i in range(count - 1):
                    t.send(TEXT, msg)
                    if i & 255 == 255:
                        if perf() > stop:
                            break
                        await lst.drain()
                        await asyncio.sleep(0)
                t.send(TEXT, end.encode())

            lst.on_frame = on_frame
            m.start()
            task = asyncio.ensure_future(writer())
            await asyncio.wait_for(done, TIMEOUT)
            await task
            m.stop(st["got"], st["got"] * size)

        elif w == "W3":
            payload = p.payload()

            def on_frame(t: Any, frame: Any) -> None:
                if not frame.fin:
                    return
                st["got"] += 1
                if frame.payload_size != size:
                    raise RuntimeError(f"echo of {frame.payload_size} bytes")
                if st["sent"] < count and perf() < p.stop:
                    t.send(BINARY, payload)
                    st["sent"] += 1
                elif st["got"] >= st["sent"]:
                    done.set_result(None)

            lst.on_frame = on_frame
            m.start()
            for _ in range(min(p.window, count)):
                t.send(BINARY, payload)
                st["sent"] += 1
            await asyncio.wait_for(done, TIMEOUT)
            m.stop(st["got"], st["got"] * size)

        elif w == "W4":

            def request() -> None:
                k = min(FLOOD_BATCH, count - st["requested"])
                t.send(TEXT, f"{k} {size}".encode())
                st["requested"] += k

            def on_frame(t: Any, frame: Any) -> None:
                frame.get_payload_as_memoryview()
                got = st["got"] = st["got"] + 1
                if got % FLOOD_BATCH == 0 and st["requested"] < count and perf() < p.stop:
                    request()
                elif got >= st["requested"] and not done.done():
                    done.set_result(None)

            lst.on_frame = on_frame
            m.start()
            request()
            if st["requested"] < count:
                request()
            await asyncio.wait_for(done, TIMEOUT)
            m.stop(st["got"], st["got"] * size)

        elif w in ("W5", "W5b"):
            payload = p.payload()

            def on_frame(t: Any, frame: Any) -> None:
                if frame.msg_type == TEXT:
                    done.set_result(frame.get_payload_as_utf8_text())

            lst.on_frame = on_frame
            check = 255 if size < 4096 else 0
            m.start()
            stop = p.stop
            sent = count
            for i in range(count):
                t.send(BINARY, payload)
                if i & check == check:
                    if perf() > stop:
                        sent = i + 1
                        break
                    await lst.drain()
            t.send(TEXT, b"count")
            reply = await asyncio.wait_for(done, TIMEOUT)
            m.stop(sent, sent * size)
            if int(reply.split()[0]) != sent:
                raise RuntimeError(f"the sink counted {reply}, {sent} were sent")
        else:
            raise ValueError(w)
        if w == "W4":
            t.disconnect(graceful=False)
        else:
            await close(t)

    asyncio.run(main())


# -- the probe: pre-built frames on a raw socket -------------------------------------------

_MASK_KEY = b"\x37\xfa\x21\x3d"


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN set) masked with a fixed key, built once before timing."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = int.from_bytes((_MASK_KEY * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
    return head + _MASK_KEY + masked


def server_frame_size(n: int) -> int:
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


def handshake_request(port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def raw_handshake(port: int, path: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(handshake_request(port, path))
    return sock, read_handshake(sock)


def read_handshake(sock: socket.socket) -> bytes:
    """Read the 101 response; returns the bytes that followed it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("handshake: connection closed")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.decode(errors="replace"))
    return rest


class ByteCounter:
    """Reads and counts bytes (recv_into one reused buffer); keeps only the tail."""

    def __init__(self, sock: socket.socket, already: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.got = len(already)
        self.last = already

    def until(self, total: int) -> None:
        recv_into, view = self.sock.recv_into, self.view
        got = self.got
        while got < total:
            n = recv_into(view)
            if not n:
                raise ConnectionError("closed")
            got += n
        self.got = got

    def tail(self, total: int) -> bytes:
        """Read until ``total`` bytes and return those of the last recv."""
        data = self.last
        while self.got < total:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed")
            self.got += len(data)
        return data


def coalesce(one: bytes, count: int, chunk: int = 65536) -> list[bytes]:
    """``count`` copies of ``one`` as writes of about ``chunk`` bytes (built before timing)."""
    if len(one) >= chunk:
        return [one] * count
    per = chunk // len(one)
    return [one * min(per, count - i) for i in range(0, count, per)]


def run_raw(m: Meter, framed: bool) -> None:
    """The probe (``framed``) or the plain-TCP ceiling."""
    p = m.p
    w = p.workload.name
    count, size = p.count, p.size

    def open_conn(mode: str) -> tuple[socket.socket, bytes]:
        if framed:
            return raw_handshake(p.ws_port, p.workload.path)
        sock = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode:
            sock.sendall(mode.encode() + b"\n")
        return sock, b""

    if w == "W7":
        # Pipelined, as picows does with asyncio: every connect and request
        # first, then every response (loopback connects complete in the kernel).
        close_frame = masked_frame(8, b"\x03\xe8")

        def open_all(n: int) -> list[socket.socket]:
            socks = []
            if framed:
                addr, request = (
                    ("127.0.0.1", p.ws_port),
                    handshake_request(p.ws_port, p.workload.path),
                )
            else:
                addr, request = ("127.0.0.1", p.tcp_port), b"idle\n"
            for _ in range(n):
                sock = socket.socket()
                sock.settimeout(TIMEOUT)
                sock.connect(addr)
                sock.sendall(request)
                socks.append(sock)
            if framed:
                for sock in socks:
                    read_handshake(sock)
            return socks

        def close_all(conns: list[socket.socket]) -> None:
            if framed:
                for sock in conns:
                    sock.sendall(close_frame)
                for sock in conns:
                    sock.recv(64)
            for sock in conns:
                sock.close()

        open_close(m, open_all, close_all)
        return

    if w in ("W1", "W2", "W3"):
        sock, rest = open_conn("echo")
    elif w == "W4":
        sock, rest = open_conn("")  # the flood is requested once the clock runs
    else:
        sock, rest = open_conn(f"sink {count * size}")
    counter = ByteCounter(sock, rest)
    echo_size = server_frame_size(size) if framed else size

    if w == "W1":
        out = masked_frame(1, p.text().encode()) if framed else p.text().encode()
        lat: list[int] = []
        m.start()
        total = 0
        for i in range(count):
            t = perf_ns()
            sock.sendall(out)
            total += echo_size
            counter.until(total)
            lat.append(perf_ns() - t)
            if i & 63 == 63 and perf() > p.stop:
                break
        m.stop(len(lat), len(lat) * size, **percentiles_us(lat))

    elif w == "W2":
        one = masked_frame(1, p.text().encode()) if framed else p.text().encode()
        chunks = coalesce(one, count)
        thread = threading.Thread(
            target=lambda: [sock.sendall(c) for c in chunks], name="bench-writer"
        )
        m.start()
        thread.start()
        counter.until(count * echo_size)
        m.stop(count, count * size)
        thread.join()

    elif w == "W3":
        payload = p.payload()
        out = masked_frame(2, payload) if framed else payload
        m.start()
        sent = 0
        for _ in range(min(p.window, count)):
            sock.sendall(out)
            sent += 1
        done = 0
        while done < sent:
            counter.until((done + 1) * echo_size)
            done = counter.got // echo_size
            while sent < min(count, done + p.window) and perf() < p.stop:
                sock.sendall(out)
                sent += 1
        m.stop(done, done * size)

    elif w == "W4":
        m.start()
        if framed:
            sock.sendall(masked_frame(1, f"{count} {size}".encode()))
        else:
            sock.sendall(f"flood {count * size}\n".encode())
        counter.until(count * echo_size)
        m.stop(count, count * size)

    else:  # W5, W5b
        payload = p.payload()
        one = masked_frame(2, payload) if framed else payload
        chunks = coalesce(one, count)
        m.start()
        for c in chunks:
            sock.sendall(c)
        if framed:
            sock.sendall(masked_frame(1, b"count"))
            reply = counter.tail(counter.got + 2)
            while len(reply) < 2 or len(reply) < 2 + reply[1]:
                reply += sock.recv(256)
            text = reply[2 : 2 + reply[1]].decode()
            if int(text.split()[0]) != count:
                raise RuntimeError(f"the sink counted {text}, {count} were sent")
        else:
            reply = counter.tail(3)
        m.stop(count, count * size)
    if framed and w != "W4":
        with contextlib.suppress(OSError):
            sock.sendall(masked_frame(8, b"\x03\xe8"))
            sock.recv(64)
    sock.close()


# -- entry point ---------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Meter], None]] = {
    "blockws-cb": run_blockws_cb,
    "blockws-recv": run_blockws_recv,
    "blockws-pure": run_blockws_cb,  # with BLOCKWS_PURE_PYTHON=1 (see workloads.CLIENTS)
    "websocket-client": run_websocket_client,
    "websocket-client+wsaccel": run_websocket_client,
    "websockets-sync": run_websockets,
    "picows": run_picows,
    "probe": lambda m: run_raw(m, framed=True),
    "tcp": lambda m: run_raw(m, framed=False),
}


@contextlib.contextmanager
def thread_profiles(path: str | None) -> Iterator[None]:
    """cProfile every thread of the child (cProfile alone sees only the main one)."""
    if not path:
        yield
        return
    import cProfile
    import pstats

    profiles: list[cProfile.Profile] = []
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    main = cProfile.Profile()
    main.enable()
    try:
        yield
    finally:
        main.disable()
        threading.Thread.run = original  # type: ignore[method-assign]
        stats = pstats.Stats(main)
        for prof in profiles:
            with contextlib.suppress(Exception):
                stats.add(prof)
        stats.dump_stats(path)


def child(args: Any) -> dict[str, Any]:
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    p = Params(args)
    m = Meter(p)
    with thread_profiles(args.profile_path):
        RUNNERS[p.client](m)
    r = m.result
    r.update(
        build=builds.probe(p.client, m.transport_type, m.details),
        client=p.client,
        workload=p.workload.name,
        requested=p.count,
        maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        # Page faults of the whole child: a large-message run that faults in
        # fresh pages (the allocator trimmed and regrew its heap) is slow.
        minflt=resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
    )
    return r
