"""Soak: many sockets for a long time, nothing lost, nothing growing.

    python -m benchmarks.soak                              # 500 sockets, 10 minutes
    python -m benchmarks.soak --sockets 50 --seconds 30    # a short one
    python -m benchmarks.soak --urls ws://127.0.0.1:P1,ws://127.0.0.1:P2 --json out.json

Half the sockets go to the `websockets` echo peer and half to Node's `ws` one
(``tests/peers``; both started here unless ``--urls`` names running ones; with
``--deflate`` every socket and peer uses permessage-deflate). Every
socket pings every second (``send_pings``, ``close_after_no_message=2``) and sends
``--rate`` messages a second, text and binary in turn, 16 B to 1 KiB, each carrying
its socket's sequence number; the peers echo them, so traffic flows both ways. One
thread drives everything as a game loop would: ``blockws.update_all()`` and
``blockws.wait()``.

Checks, printed as a summary (exit status 1 if any fails):

* **nothing lost or reordered**: every echo arrives, in order, with its content;
  after the sending stops, every socket drains, and then closes with 1000;
* **no socket ends early** (no ``on_closed`` before the end);
* **threads and descriptors constant**: sampled every second after the warm-up, one
  reader per socket throughout, descriptors the same at the end as after the warm-up,
  and, writer threads aside, the thread count never above its warm-up maximum; writer
  threads come and go (a socket has one only while its writes back up), at most one per
  socket;
* **RSS growth under 5 %** from the end of the warm-up to the end. The warm-up is the
  first minute, or the first half of a run shorter than 2 minutes. And the Python heap
  (``sys.getallocatedblocks()``, live objects) grows under 5 % too.

About RSS: the 5 % rule holds with glibc's default allocator. Two causes of
growth were found with this soak and removed: ``recv(n)`` allocated 64 KiB per read
and shrank it to what came, and with hundreds of reader threads those shrunk blocks
fragmented the allocator's arenas (a 100-socket, 3-minute run: +84 %; the reader now
reads small messages into a reusable buffer: +0.5 %); and each socket's mask-key
batch doubled, up to 64 KiB, as it sent (one source per process now).
``--no-tcache`` turns glibc's per-thread caches off
(``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``), to tell a leak from caching
when investigating.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import shutil
import statistics
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blockws

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from peerutil import PEERS_DIR, free_port, start_server  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def payload(sock_id: int, seq: int) -> bytes:
    """The message ``seq`` of socket ``sock_id``: its numbers, then a pattern from them."""
    head = struct.pack("!II", sock_id, seq)
    size = 16 + (seq * 37 + sock_id * 11) % 1009
    return (head * (size // 8 + 1))[:size]


class Peer:
    """One socket's sending and checking state (touched on the loop's thread only)."""

    def __init__(self, sock_id: int, url: str, stats: Stats, deflate: bool = False) -> None:
        self.id = sock_id
        self.url = url
        self.stats = stats
        self.sent = 0  # next sequence number to send
        self.expected = 0  # next sequence number to receive
        self.opened = False
        self.closed: tuple[int, str] | None = None
        self.ws = blockws.WebSocket(
            url,
            # min_size=0: every message compressed, both ways (the peers compress too).
            extensions=[blockws.PerMessageDeflate(min_size=0)] if deflate else [],
            send_pings=True,
            ping_frequency=1.0,
            close_after_no_message=2.0,
            on_open=self.on_open,
            on_message=self.on_message,
            on_binary=self.on_binary,
            on_closed=self.on_closed,
        )

    def on_open(self, ws: blockws.WebSocket) -> None:
        self.opened = True

    def _check(self, data: bytes) -> None:
        sock_id, seq = struct.unpack("!II", data[:8])
        if sock_id != self.id or data != payload(self.id, seq):
            self.stats.corrupt += 1
        elif seq != self.expected:
            self.stats.reordered += 1
            self.expected = max(self.expected, seq + 1)
        else:
            self.expected += 1
        self.stats.received += 1

    def on_message(self, ws: blockws.WebSocket, text: str) -> None:
        self._check(bytes.fromhex(text))

    def on_binary(self, ws: blockws.WebSocket, segment: blockws.BufferSegment) -> None:
        self._check(bytes(segment))

    def on_closed(self, ws: blockws.WebSocket, code: int, reason: str) -> None:
        if self.closed is not None:
            self.stats.double_closes += 1
        self.closed = (code, reason)
        if ws.error is not None:
            self.stats.close_errors.append((self.id, repr(ws.error)))

    def send_next(self) -> None:
        data = payload(self.id, self.sent)
        self.ws.send(data.hex() if self.sent % 2 == 0 else data)
        self.sent += 1
        self.stats.sent += 1


@dataclass
class Stats:
    sockets: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    deflate: bool = False
    sent: int = 0
    received: int = 0
    lost: int = 0
    reordered: int = 0
    corrupt: int = 0
    early_closes: list[Any] = field(default_factory=list)
    close_errors: list[Any] = field(default_factory=list)  # (socket, repr(ws.error))
    bad_final_closes: list[Any] = field(default_factory=list)
    double_closes: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    warmup_seconds: float = 0.0
    readers: list[int] = field(default_factory=list)  # min, max after warm-up
    threads_warmup_max: int = 0
    threads_after_max: int = 0  # writer threads aside
    writers_max: int = 0  # after the warm-up
    fds_warmup: int = 0
    fds_end: int = 0
    fds_after: list[int] = field(default_factory=list)  # min, max after warm-up
    rss_warmup_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth_pct: float = 0.0
    blocks_warmup: int = 0  # sys.getallocatedblocks(): Python objects alive
    blocks_end: int = 0
    blocks_growth_pct: float = 0.0
    failures: list[str] = field(default_factory=list)


def _readers_writers() -> tuple[int, int]:
    names = [t.name for t in threading.enumerate()]
    return (sum(1 for n in names if n.endswith("-reader")),
            sum(1 for n in names if n.endswith("-writer")))


def run(urls: list[str], sockets: int, seconds: float, rate: float,
        progress: bool = True, deflate: bool = False) -> Stats:
    stats = Stats(sockets=sockets, seconds=seconds, rate=rate, deflate=deflate)
    warmup = min(60.0, seconds / 2)
    stats.warmup_seconds = warmup
    peers = [Peer(i, urls[i % len(urls)], stats, deflate) for i in range(sockets)]
    for peer in peers:
        peer.ws.open()
    deadline = time.monotonic() + 30
    while not all(p.opened or p.closed for p in peers):
        if time.monotonic() > deadline:
            stats.failures.append("sockets did not open within 30 s")
            break
        blockws.wait(0.5)
        blockws.update_all()
    start = time.monotonic()
    interval = 1.0 / rate
    # Spread the sockets' sends over the interval, so they do not all send at once.
    due = [start + interval * i / sockets for i in range(sockets)]
    # The soak's own bookkeeping must not grow the memory it watches: the
    # latency samples go into raw doubles allocated whole before the warm-up
    # (appending 500 a second grew RSS by 2.4 MiB over a 10-minute run), and
    # the other samples are running minimums and maximums.
    capacity = sockets * (int(seconds) + 2)
    latencies = array.array("d", bytes(8 * capacity))
    n_latencies = 0
    threads_warmup = threads_after = 0
    readers = [sys.maxsize, 0]
    fds_after = [sys.maxsize, 0]
    next_sample = start + 1.0
    warm_done = False
    while (now := time.monotonic()) < start + seconds:
        for i, peer in enumerate(peers):
            if due[i] <= now and peer.closed is None:
                peer.send_next()
                due[i] += interval
        blockws.update_all()
        if now >= next_sample:
            next_sample += 1.0
            for p in peers:
                latency = p.ws.latency
                if latency is not None and n_latencies < capacity:
                    latencies[n_latencies] = latency
                    n_latencies += 1
            count = threading.active_count()
            n_readers, n_writers = _readers_writers()
            if now - start < warmup:
                threads_warmup = max(threads_warmup, count - n_writers)
            else:
                if not warm_done:
                    warm_done = True
                    stats.fds_warmup = fd_count()
                    stats.rss_warmup_mb = rss_bytes() / 2**20
                    stats.blocks_warmup = sys.getallocatedblocks()
                threads_after = max(threads_after, count - n_writers)
                readers[:] = min(readers[0], n_readers), max(readers[1], n_readers)
                stats.writers_max = max(stats.writers_max, n_writers)
                fds = fd_count()
                fds_after[:] = min(fds_after[0], fds), max(fds_after[1], fds)
            if progress:
                print(f"  {now - start:5.0f} s: sent {stats.sent}, received {stats.received}, "
                      f"threads {count}, fds {fd_count()}, rss {rss_bytes() / 2**20:.1f} MiB",
                      file=sys.stderr, flush=True)
        early = [(p.id, p.closed) for p in peers if p.closed is not None]
        if early:
            stats.early_closes = early
            break
        blockws.wait(max(0.0, min(min(due), next_sample) - time.monotonic()))
    # Drain: every echo of what was sent.
    drain = time.monotonic() + 10
    while stats.received < stats.sent and time.monotonic() < drain:
        blockws.wait(0.1)
        blockws.update_all()
    stats.fds_end = fd_count()
    stats.rss_end_mb = rss_bytes() / 2**20
    stats.blocks_end = sys.getallocatedblocks()
    for peer in peers:
        peer.ws.close()
    closing = time.monotonic() + 15
    while not all(p.closed for p in peers) and time.monotonic() < closing:
        blockws.wait(0.1)
        blockws.update_all()
    for peer in peers:
        peer.ws.join(5)
        if peer.closed != (1000, "") and (peer.id, peer.closed) not in stats.early_closes:
            stats.bad_final_closes.append((peer.id, peer.closed))
    blockws.update_all()

    stats.lost = sum(p.sent - p.expected for p in peers)
    if n_latencies:
        ordered = sorted(latencies[:n_latencies])
        stats.latency_p50_ms = round(statistics.median(ordered) * 1000, 3)
        stats.latency_p99_ms = round(ordered[int(len(ordered) * 0.99)] * 1000, 3)
    stats.threads_warmup_max = threads_warmup
    stats.threads_after_max = threads_after
    stats.readers = readers if readers[1] else [0, 0]
    stats.fds_after = fds_after if fds_after[1] else [0, 0]
    if stats.rss_warmup_mb:
        stats.rss_growth_pct = round(100 * (stats.rss_end_mb / stats.rss_warmup_mb - 1), 2)
    if stats.blocks_warmup:
        stats.blocks_growth_pct = round(100 * (stats.blocks_end / stats.blocks_warmup - 1), 2)
    _judge(stats)
    return stats


def _judge(stats: Stats) -> None:
    f = stats.failures
    if stats.lost or stats.reordered or stats.corrupt:
        f.append(f"lost {stats.lost}, reordered {stats.reordered}, corrupt {stats.corrupt}")
    if stats.early_closes:
        f.append(f"{len(stats.early_closes)} socket(s) closed early: {stats.early_closes[:5]}"
                 f" (errors: {stats.close_errors[:5]})")
    if stats.bad_final_closes:
        f.append(f"{len(stats.bad_final_closes)} socket(s) did not close with 1000: "
                 f"{stats.bad_final_closes[:5]}")
    if stats.double_closes:
        f.append(f"on_closed ran twice {stats.double_closes} time(s)")
    if stats.readers != [stats.sockets, stats.sockets]:
        f.append(f"reader threads {stats.readers}, not {stats.sockets} throughout")
    if stats.threads_after_max > stats.threads_warmup_max:
        f.append(f"threads grew: {stats.threads_after_max} after the warm-up, "
                 f"{stats.threads_warmup_max} at most during it (writers aside)")
    if stats.writers_max > stats.sockets:
        f.append(f"{stats.writers_max} writer threads for {stats.sockets} sockets")
    if stats.fds_end != stats.fds_warmup or stats.fds_after[0] != stats.fds_after[1]:
        f.append(f"descriptors changed: {stats.fds_warmup} after the warm-up, "
                 f"{stats.fds_after} in between, {stats.fds_end} at the end")
    if stats.rss_growth_pct >= 5.0:
        f.append(f"RSS grew {stats.rss_growth_pct} % after the warm-up")
    if stats.blocks_growth_pct >= 5.0:
        f.append(f"Python objects grew {stats.blocks_growth_pct} % after the warm-up")


def summary(stats: Stats) -> str:
    tcache = "off" if "tcache_count=0" in os.environ.get("GLIBC_TUNABLES", "") else "on"
    lines = [
        f"soak: {stats.sockets} sockets{' with deflate' if stats.deflate else ''}, "
        f"{stats.seconds:.0f} s, {stats.rate:g} msgs/s each way per socket, pings every 1 s "
        f"(warm-up {stats.warmup_seconds:.0f} s, glibc tcache {tcache})",
        f"  messages: sent {stats.sent}, echoed {stats.received}, lost {stats.lost}, "
        f"reordered {stats.reordered}, corrupt {stats.corrupt}",
        f"  closes: early {len(stats.early_closes)}, not 1000 at the end "
        f"{len(stats.bad_final_closes)}, on_closed twice {stats.double_closes}",
        f"  ping latency: p50 {stats.latency_p50_ms} ms, p99 {stats.latency_p99_ms} ms",
        f"  threads: readers {stats.readers[0]}-{stats.readers[1]}, writers at most "
        f"{stats.writers_max}, the others max {stats.threads_warmup_max} in warm-up, "
        f"{stats.threads_after_max} after",
        f"  descriptors: {stats.fds_warmup} after warm-up, {stats.fds_after[0]}-"
        f"{stats.fds_after[1]} in between, {stats.fds_end} at the end",
        f"  RSS: {stats.rss_warmup_mb:.1f} MiB after warm-up, {stats.rss_end_mb:.1f} MiB at "
        f"the end ({stats.rss_growth_pct:+.2f} %); Python heap blocks {stats.blocks_warmup} "
        f"-> {stats.blocks_end} ({stats.blocks_growth_pct:+.2f} %)",
        "  result: " + ("PASS" if not stats.failures else "FAIL: " + "; ".join(stats.failures)),
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def peers(*flags: str) -> Iterator[list[str]]:
    """Start the `websockets` and Node `ws` echo peers (with ``flags``); yields their URLs."""
    node = shutil.which("node")
    if node is None or not (PEERS_DIR / "node_modules" / "ws").is_dir():
        raise SystemExit("the Node ws peer is missing: npm install --prefix tests/peers")
    p1, p2 = free_port(), free_port()
    with start_server([sys.executable, str(PEERS_DIR / "ws_echo_server.py"), "--port", str(p1),
                       *flags], p1), \
         start_server([node, str(PEERS_DIR / "node_ws_server.js"), "--port", str(p2), *flags],
                      p2):
        yield [f"ws://127.0.0.1:{p1}", f"ws://127.0.0.1:{p2}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=5.0, help="messages/s per socket")
    parser.add_argument("--urls", help="comma-separated echo servers (default: start both)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--deflate", action="store_true",
                        help="permessage-deflate on every socket (and on the peers started)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--no-tcache", action="store_true",
                        help="turn glibc's per-thread caches off (see above)")
    args = parser.parse_args(argv)
    if args.no_tcache and "tcache_count=0" not in os.environ.get("GLIBC_TUNABLES", ""):
        # The allocator reads GLIBC_TUNABLES at start: run again with it set.
        env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.soak",
                                   *(argv if argv is not None else sys.argv[1:])], env)
    with contextlib.ExitStack() as stack:
        urls = args.urls.split(",") if args.urls else stack.enter_context(
            peers(*(["--deflate"] if args.deflate else [])))
        stats = run(urls, args.sockets, args.seconds, args.rate, progress=not args.quiet,
                    deflate=args.deflate)
    print(summary(stats), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(stats), indent=1))
    return 1 if stats.failures else 0


if __name__ == "__main__":
    sys.exit(main())
