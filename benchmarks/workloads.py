"""What is measured: the workloads, the clients, and the targets printed beside the ratios.

Each workload has a full-run size (the issue's figures); ``--quick`` and the
smoke test scale the counts down. ``metric`` is the figure the ratios are
taken on (higher is better for every one of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    path: str  # server endpoint (benchmarks/server.py)
    count: int  # messages (or round trips, or connections) in a full run
    size: int  # payload bytes per message
    window: int = 0  # messages in flight (W3)
    metric: str = "msgs/s"  # the unit of the headline figure
    same_cpu: bool = False  # run the server on the client's CPU (W1)
    capped: bool = True  # a measurement may stop early at the time budget
    target: str = ""  # printed next to blockws' ratios, never asserted
    target_ratio: float | None = None  # blockws / best threaded peer, at least
    min_count: int = 2  # smallest count a scaled-down run uses
    clients: tuple[str, ...] = ()  # the only clients measured (empty: every one)
    why_only: str = ""  # printed when ``clients`` leaves some out


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "W1",
            "32 B text echo, one in flight",
            "/echo",
            20_000,
            32,
            metric="rt/s",
            same_cpu=True,
            target=">= 1.2x best threaded peer",
            target_ratio=1.2,
            min_count=20,
        ),
        Workload(
            "W2",
            "32 B text echo, 100 k pipelined (writer thread, main thread receives)",
            "/echo",
            100_000,
            32,
            target=">= 5x best threaded peer",
            target_ratio=5.0,
            min_count=20,
        ),
        Workload(
            "W3",
            "1 MiB binary echo, 4 in flight",
            "/echo",
            256,
            1 << 20,
            window=4,
            metric="MB/s",
            target=">= 1.0x best threaded peer",
            target_ratio=1.0,
            min_count=4,
        ),
        Workload(
            "W4",
            "server floods 64 B binary",
            "/flood",
            500_000,
            64,
            target=">= 5x best threaded peer",
            target_ratio=5.0,
            min_count=20,
        ),
        Workload(
            "W5",
            "client sends 64 B binary to a sink",
            "/sink",
            500_000,
            64,
            target=">= 5x best threaded peer",
            target_ratio=5.0,
            min_count=20,
        ),
        Workload(
            "W5b",
            "client sends 1 MiB binary to a sink (masking)",
            "/sink",
            256,
            1 << 20,
            metric="MB/s",
            target=">= 1.0x best threaded peer",
            target_ratio=1.0,
            min_count=2,
        ),
        Workload(
            "W7",
            "open idle connections, then close them",
            "/echo",
            500,
            0,
            metric="conns/s",
            capped=False,
            target="<= 24 kB of RSS per idle connection; threads <= 1 per connection + a few",
            min_count=100,
        ),
        Workload(
            "W8",
            "2,000 sockets, each sent 10 msgs/s, pumped by one update_all() per 60 Hz frame",
            "/pulse",
            2_000,
            64,
            target="idle update_all() < 2 us whatever the socket count; CPU/msg and frame "
            "time reported",
            min_count=20,
            clients=("blockws-cb", "blockws-pure"),
            why_only="blockws only: no peer has an update_all() that pumps every socket's "
            "callbacks from the caller's thread; picows would need its own asyncio loop "
            "design, the threaded peers a thread per socket",
        ),
    )
}


@dataclass(frozen=True)
class Client:
    name: str
    kind: str  # "blockws", "peer", "probe" or "ceiling"
    threaded: bool = False  # a threaded (not asyncio) peer: the targets' reference
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)


CLIENTS: dict[str, Client] = {
    c.name: c
    for c in (
        Client("blockws-cb", "blockws", note="callbacks pumped by `ws.wait(); ws.update()`"),
        Client("blockws-recv", "blockws", note="blocking `ws.receive()`"),
        Client(
            "blockws-pure",
            "blockws",
            note="callbacks, without the optional C speedup (`BLOCKWS_PURE_PYTHON=1`)",
            env={"BLOCKWS_PURE_PYTHON": "1"},
        ),
        Client(
            "websocket-client",
            "peer",
            threaded=True,
            note="without wsaccel",
            env={"BENCH_NO_WSACCEL": "1"},
        ),
        Client("websocket-client+wsaccel", "peer", threaded=True, note="with wsaccel"),
        Client("websockets-sync", "peer", threaded=True, note="websockets.sync.client"),
        Client("picows", "peer", note="asyncio + Cython"),
        Client("probe", "probe", note="pre-built frames, counts bytes: the server's headroom"),
        Client(
            "tcp",
            "ceiling",
            note="the same payload bytes over plain TCP: no framing, no per-message work",
        ),
    )
}

PEERS = [c.name for c in CLIENTS.values() if c.kind == "peer"]
THREADED_PEERS = [c.name for c in CLIENTS.values() if c.threaded]
BLOCKWS = [c.name for c in CLIENTS.values() if c.kind == "blockws"]


def scaled_count(workload: Workload, scale: float) -> int:
    return max(workload.min_count, int(workload.count * scale))
