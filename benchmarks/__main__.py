"""blockws beside the other Python WebSocket clients: ``python -m benchmarks``.

    python -m benchmarks --quick            # 1 round, small counts: under two minutes
    python -m benchmarks                    # the full run: 3 rounds, 6-10 minutes
    python -m benchmarks --workloads W1,W4 --clients blockws-cb,picows,probe
    python -m benchmarks --profile blockws-cb:W4     # cProfile one child, every thread
    python -m benchmarks --server node --workloads W2,W5 # against benchmarks/server.js

Clients: blockws twice (callbacks pumped by ``ws.wait(); ws.update()``, and
the blocking ``ws.receive()``), websocket-client without and with wsaccel,
websockets' sync client, picows (asyncio + Cython); plus two references, a
``probe`` that sends pre-built frames and only counts bytes (it must beat
every real client, which shows the server is not the bottleneck) and
``tcp``, the same payload bytes over plain TCP (the ceiling).

The server (``benchmarks/server.py``, picows with coalesced writes; with
``--server node``, its Node.js twin ``benchmarks/server.js``, W1-W7 only)
runs in its own process, pinned to one CPU; each measurement runs in a fresh
interpreter pinned to the other CPU, except W1, where a cross-CPU wake-up
(about 70 us on this VM) would dominate a round trip: there the server is
moved to the client's CPU. Clients are interleaved round by round (A B C,
A B C); the report gives medians, the ratios to the best peer, to the best
threaded peer (the targets' reference), to picows and to the TCP ceiling (each
the median of the per-round ratios, with their min-max), client CPU per
operation, client and server CPU load, messages per TCP segment, and peak RSS;
W7 the RSS per idle connection, W8 (blockws only) the cost of pumping 2,000
sockets with ``update_all()`` at 60 Hz. Then the game-loop measurements of
``benchmarks/gameloop.py``.

Every child reports which build of its client it ran (``benchmarks/builds.py``);
a column that ran without its compiled build gets no ratios and the run exits
with status 3 after writing its report (``--allow-uncompiled``: status 0).

Output: a Markdown report (printed, and written with ``--md``) and a JSON
file (``--json``) holding every run. Nothing here asserts a figure; the
targets are printed beside the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any

from . import builds
from ._harness import ROOT, free_port, median, pin, run_child, server, table
from .workloads import BLOCKWS, CLIENTS, PEERS, THREADED_PEERS, WORKLOADS, scaled_count

PACKAGES = ("blockws", "websocket-client", "wsaccel", "websockets", "picows", "aiofastnet")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, 1/20 of the counts")
    ap.add_argument("--rounds", type=int, help="rounds per client and workload (default 3)")
    ap.add_argument("--scale", type=float, help="multiply every count (default 1)")
    ap.add_argument(
        "--budget", type=float, help="seconds after which a long measurement stops (default 2)"
    )
    ap.add_argument("--clients", help="comma-separated subset of: " + ", ".join(CLIENTS))
    ap.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(WORKLOADS))
    ap.add_argument(
        "--allow-uncompiled",
        action="store_true",
        help="exit 0 even when a client ran without its compiled build (its column still "
        "gets no ratios)",
    )
    ap.add_argument("--no-gameloop", action="store_true", help="skip benchmarks/gameloop.py")
    ap.add_argument(
        "--server",
        choices=SERVERS,
        default="picows",
        help="picows: benchmarks/server.py (default); node: benchmarks/server.js, whose /sink "
        "counts frames without unmasking them (W1-W7; no W8, no game loop)",
    )
    ap.add_argument(
        "--json",
        default=os.path.join(ROOT, ".benchmarks", "results.json"),
        help="write every run and the summary here (default .benchmarks/results.json)",
    )
    ap.add_argument(
        "--md",
        default=os.path.join(ROOT, ".benchmarks", "results.md"),
        help="write the Markdown report here (default .benchmarks/results.md)",
    )
    ap.add_argument("--profile", metavar="CLIENT:WORKLOAD", help="cProfile one measurement")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument(
        "--jobs", type=int, default=1, help="children at once (smoke tests only: ruins figures)"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="the smallest counts, 4 jobs: checks the harness"
    )
    # the child side (one measurement)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ws-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tcp-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cpus", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", dest="profile_path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = args.quick
    if args.smoke:
        args.rounds, args.scale, args.budget = args.rounds or 1, 0.0, args.budget or 0.2
        args.jobs = max(args.jobs, 4)
    if args.rounds is None:
        args.rounds = 1 if quick else 3
    if args.scale is None:
        args.scale = 0.05 if quick else 1.0
    if args.budget is None:
        args.budget = 0.4 if quick else 2.0
    return args


#: The benchmark servers (``--server``): the command after the two ports.
SERVERS = ("picows", "node")


def server_cmd(name: str, ports: tuple[int, int]) -> list[str]:
    if name == "node":
        return ["node", os.path.join(ROOT, "benchmarks", "server.js"), str(ports[0]), str(ports[1])]
    return [sys.executable, "-m", "benchmarks.server", str(ports[0]), str(ports[1])]


def node_version() -> str:
    import subprocess

    try:
        out = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise SystemExit(f"--server node: cannot run node ({exc})") from None
    return out.stdout.strip()


def cpu_plan() -> tuple[int, int]:
    """(server CPU, client CPU): two different CPUs when there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], cpus[-1]


def log(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


# -- running -----------------------------------------------------------------------------


def child_args(
    client: str,
    workload: str,
    count: int,
    ports: tuple[int, int],
    pid: int,
    cpu: int,
    budget: float,
) -> list[str]:
    return [
        "--client", client,
        "--workload", workload,
        "--count", str(count),
        "--ws-port", str(ports[0]),
        "--tcp-port", str(ports[1]),
        "--server-pid", str(pid),
        "--cpus", str(cpu),
        "--budget", str(budget),
    ]  # fmt: skip


def runs_on(wname: str, client: str) -> bool:
    """Whether ``client`` is measured on workload ``wname`` (W8 is blockws only)."""
    only = WORKLOADS[wname].clients
    return not only or client in only


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, run every (workload, round, client) child; return the raw runs."""
    clients = args.clients.split(",") if args.clients else list(CLIENTS)
    workloads = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    for name in clients:
        if name not in CLIENTS:
            raise SystemExit(f"unknown client {name!r}; known: {', '.join(CLIENTS)}")
    for name in workloads:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    node = ""
    if args.server == "node":
        node = node_version()
        left = [w for w in workloads if w == "W8"]
        if left:
            raise SystemExit("--server node: no /pulse endpoint for W8; leave it out")
        args.no_gameloop = True  # its /stream endpoint is server.py's alone
    server_cpu, client_cpu = cpu_plan()
    ports = (free_port(), free_port())
    runs: list[dict[str, Any]] = []
    gameloop: list[dict[str, Any]] = []
    started = time.time()
    with tempfile.NamedTemporaryFile(prefix="blockws-bench-server-", suffix=".log") as errlog:
        cmd = server_cmd(args.server, ports)
        with server(cmd, ports[0], log=errlog.name) as proc:
            pin(proc.pid, {server_cpu})

            def one(wname: str, rnd: int, client: str) -> dict[str, Any]:
                t0 = time.monotonic()
                w = WORKLOADS[wname]
                cargs = child_args(
                    client, wname, scaled_count(w, args.scale), ports, proc.pid, client_cpu,
                    args.budget,
                )  # fmt: skip
                timeout = args.budget * 3 + 60 + (w.count * args.scale / 10 if wname == "W8" else 0)
                try:
                    r = run_child("benchmarks", cargs, timeout=timeout, env=CLIENTS[client].env)
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    r = {"client": client, "workload": wname, "error": str(exc)[-3000:]}
                r["round"] = rnd
                r["same_cpu"] = w.same_cpu and args.jobs == 1
                log(args, progress(r, time.monotonic() - t0))
                return r

            if args.jobs > 1:
                # Smoke testing only: concurrent children disturb each other's figures.
                tasks = [
                    (wname, rnd, client)
                    for wname in workloads
                    for rnd in range(args.rounds)
                    for client in clients
                    if runs_on(wname, client)
                ]
                with ThreadPoolExecutor(args.jobs) as pool:
                    runs = list(pool.map(lambda t: one(*t), tasks))
            else:
                for wname in workloads:
                    same = WORKLOADS[wname].same_cpu
                    pin(proc.pid, {client_cpu} if same else {server_cpu})
                    if args.server == "node":
                        # Node compiles its hot functions as they run: one untimed
                        # probe first, so that no client measures the warm-up.
                        one(wname, -1, "probe")
                    for rnd in range(args.rounds):
                        for client in clients:  # interleaved: A B C, A B C, ...
                            if not runs_on(wname, client):
                                continue
                            runs.append(one(wname, rnd, client))
                            if proc.poll() is not None:
                                raise RuntimeError("the benchmark server died")
                pin(proc.pid, {server_cpu})
            if not args.no_gameloop:
                from . import gameloop

                gameloop = gameloop.run_all(
                    ports[0], proc.pid, server_cpu, client_cpu, quick=args.quick,
                    tiny=args.smoke, jobs=args.jobs, say=lambda s: log(args, s),
                )  # fmt: skip
            if proc.poll() is not None:
                raise RuntimeError("the benchmark server died")
    return {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 1),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": {"server": server_cpu, "client": client_cpu},
            "server": "benchmarks/server.py (picows)"
            if args.server == "picows"
            else f"benchmarks/server.js (Node.js {node})",
            "rounds": args.rounds,
            "scale": args.scale,
            "budget_s": args.budget,
            "jobs": args.jobs,
            "packages": versions(),
        },
        "runs": runs,
        "gameloop": gameloop,
    }


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def rate(r: dict[str, Any]) -> float:
    """The headline figure of one run (higher is better)."""
    w = WORKLOADS[r["workload"]]
    if w.metric == "MB/s":
        return float(r["bytes"]) / r["elapsed"] / 1e6
    return float(r["ops"]) / r["elapsed"]


def progress(r: dict[str, Any], took: float) -> str:
    head = f"{r['workload']:>4} r{r['round'] + 1} {r['client']:<25}"
    if "error" in r:
        return f"{head} ERROR {r['error'].strip().splitlines()[-1][:150]}"
    w = WORKLOADS[r["workload"]]
    client, server = (100 * r[k] / r["elapsed"] for k in ("cpu", "server_cpu"))
    cpu = f"client CPU {client:3.0f}%, server {server:3.0f}%"
    segs = ""
    if r.get("segs_out") and r.get("segs_in"):
        segs = f", ops/segment out {r['ops'] / r['segs_out']:.1f} in {r['ops'] / r['segs_in']:.1f}"
    return f"{head} {rate(r):>12,.1f} {w.metric:<7} {cpu}{segs} ({took:.1f} s)"


# -- summarizing -------------------------------------------------------------------------


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (workload, client): medians and spreads over the rounds, ratios, targets.

    A client whose children did not run the build its column names (see
    ``benchmarks/builds.py``) gets ``invalid`` (the reasons) and no ratios, and is
    left out of every other row's ratios.
    """
    rows: list[dict[str, Any]] = []
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in data["runs"]:
        by_key.setdefault((r["workload"], r["client"]), []).append(r)
    for (wname, client), rs in by_key.items():
        ok = [r for r in rs if "error" not in r]
        row: dict[str, Any] = {"workload": wname, "client": client, "runs": len(ok)}
        if len(ok) < len(rs):
            row["errors"] = [r["error"] for r in rs if "error" in r]
        if not ok:
            rows.append(row)
            continue
        bad = sorted({p for r in ok for p in builds.problems(client, r.get("build"))})
        if bad:
            row["invalid"] = "; ".join(bad)
        rates = [rate(r) for r in ok]
        row["rate"] = median(rates)
        row["rate_min"], row["rate_max"] = min(rates), max(rates)
        row["rate_by_round"] = {str(r["round"]): rate(r) for r in ok}
        row["ops"] = median([r["ops"] for r in ok])
        row["requested"] = ok[0]["requested"]
        row["cpu_us_per_op"] = median([r["cpu"] / max(1, r["ops"]) * 1e6 for r in ok])
        row["client_cpu_pct"] = median([100 * r["cpu"] / r["elapsed"] for r in ok])
        row["server_cpu_pct"] = median([100 * r["server_cpu"] / r["elapsed"] for r in ok])
        row["peak_rss_mb"] = max(r["maxrss_kb"] for r in ok) / 1024
        for key, seg in (("ops_per_seg_out", "segs_out"), ("ops_per_seg_in", "segs_in")):
            per = [r["ops"] / r[seg] for r in ok if r.get(seg)]
            if per:
                row[key] = median(per)
                row[key + "_rounds"] = per
        for key in ("p50_us", "p99_us", "open_s", "close_s", "threads_open", "threads_base"):
            if key in ok[0]:
                row[key] = median([r[key] for r in ok])
        for key in W8_KEYS:
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                row[key] = median(values)
                row[key + "_min"], row[key + "_max"] = min(values), max(values)
        if "expected" in ok[0]:
            row["delivered_pct"] = median([100 * r["ops"] / max(1, r["expected"]) for r in ok])
            row["stalled"] = f"{sum(1 for r in ok if r.get('stalled'))} of {len(ok)}"
            early = sum(1 for r in ok if r.get("warmed_up") is False)
            if early:
                row["stalled"] += f" ({early} in the warm-up: figures from the first frame)"
        if "rss_open_kb" in ok[0]:
            row["rss_open_mb"] = median([r["rss_open_kb"] for r in ok]) / 1024
            # W7 opens ``ops`` connections; W8 holds ``sockets`` (its ops are messages)
            row["rss_kb_per_conn"] = median(
                [
                    (r["rss_open_kb"] - r["rss_base_kb"]) / max(1, r.get("sockets", r["ops"]))
                    for r in ok
                ]
            )
        rows.append(row)
    for wname in {r["workload"] for r in rows}:
        add_ratios([r for r in rows if r["workload"] == wname])
    order = {name: i for i, name in enumerate(CLIENTS)}
    worder = {name: i for i, name in enumerate(WORKLOADS)}
    rows.sort(key=lambda r: (worder[r["workload"]], order[r["client"]]))
    return rows


def paired_ratio(row: dict[str, Any], ref: dict[str, Any]) -> list[float]:
    """``row``'s rate over ``ref``'s, round by round (rounds where both ran)."""
    mine, theirs = row["rate_by_round"], ref["rate_by_round"]
    return [mine[k] / theirs[k] for k in sorted(mine, key=int) if theirs.get(k)]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's ratios to the best peer, the best threaded peer and the TCP ceiling.

    The reference is the client with the best median rate; the ratio is the
    median of the per-round ratios (rounds are interleaved, so round k of both
    ran under the same load), with their min and max beside it (``*_min``,
    ``*_max``, every round's in ``*_rounds``). Invalid rows neither get ratios
    nor serve as a reference.
    """
    valid = {r["client"]: r for r in rows if "rate" in r and "invalid" not in r}
    peers = [valid[c] for c in PEERS if c in valid]
    threaded = [valid[c] for c in THREADED_PEERS if c in valid]
    refs = {
        "x_best_peer": max(peers, key=lambda r: r["rate"], default=None),
        "x_best_threaded": max(threaded, key=lambda r: r["rate"], default=None),
        "x_picows": valid.get("picows"),
        "x_tcp": valid.get("tcp"),
    }
    w = WORKLOADS[rows[0]["workload"]]
    for row in rows:
        if "rate" not in row or "invalid" in row:
            continue
        for key, ref in refs.items():
            if ref is None or not ref["rate"]:
                continue
            per_round = paired_ratio(row, ref)
            if not per_round:
                continue
            row[key] = median(per_round)
            row[key + "_min"], row[key + "_max"] = min(per_round), max(per_round)
            row[key + "_rounds"] = per_round
            row[key + "_ref"] = ref["client"]
        if row["client"] in BLOCKWS:
            row["target"] = w.target
            row["target_met"] = target_met(row, rows)


#: W8's figures, each reported as a median with its min-max over the rounds
W8_KEYS = (
    "sockets",
    "sockets_open",
    "frames",
    "late_frames",
    "frame_p50_us",
    "frame_p99_us",
    "frame_max_us",
    "idle_update_all_us",
    "idle_update_all_p99_us",
    "idle_update_all_us_no_sockets",
    "lat_p50_us",
    "lat_p99_us",
)
W7_KB_PER_CONN = 24.0  # issue 14: 500 idle sockets cost <= 24 kB of RSS each
W8_IDLE_US = 2.0  # issue 14: update_all() with nothing pending, whatever the socket count


def target_met(row: dict[str, Any], rows: list[dict[str, Any]]) -> bool | None:
    w = WORKLOADS[row["workload"]]
    if w.target_ratio is not None:
        x = row.get("x_best_threaded")
        return None if x is None else bool(x >= w.target_ratio)
    if w.name == "W7":
        threads_ok = row["threads_open"] <= row["ops"] + row["threads_base"] + 4
        return bool(threads_ok and row["rss_kb_per_conn"] <= W7_KB_PER_CONN)
    if w.name == "W8":
        idle = row.get("idle_update_all_us")
        return None if idle is None else bool(idle < W8_IDLE_US)
    return None


def headroom(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Probe against the best real client, per workload: above 1 means the server kept up."""
    out = []
    for wname in WORKLOADS:
        ws = [r for r in rows if r["workload"] == wname and "rate" in r]
        probe = next((r for r in ws if r["client"] == "probe"), None)
        real = [
            r for r in ws if CLIENTS[r["client"]].kind in ("blockws", "peer") and "invalid" not in r
        ]
        if probe is None or not real:
            continue
        best = max(real, key=lambda r: r["rate"])
        out.append(
            {
                "workload": wname,
                "probe": probe["rate"],
                "best_client": best["client"],
                "best": best["rate"],
                "ratio": probe["rate"] / best["rate"],
                "ok": probe["rate"] > best["rate"],
                "probe_server_cpu_pct": probe.get("server_cpu_pct"),
                "best_server_cpu_pct": best.get("server_cpu_pct"),
                "best_x_tcp": best.get("x_tcp"),
            }
        )
    return out


def headroom_verdict(h: dict[str, Any]) -> str:
    if h["ok"]:
        return "yes"
    if h.get("best_x_tcp") is not None and h["best_x_tcp"] >= 0.9:
        return "tie at the TCP ceiling"
    return "**no**"


# -- the report --------------------------------------------------------------------------


def yes_no(value: Any) -> str:
    return "" if value is None else ("yes" if value else "**no**")


RATIO_KEYS = ("x_best_peer", "x_best_threaded", "x_picows", "x_tcp")


def with_spread(row: dict[str, Any], key: str) -> str | None:
    """``"1.23 [0.98-1.40]"``: the median ratio and its min-max over the rounds."""
    if key not in row:
        return None
    text = f"{row[key]:.2f}"
    if len(row.get(key + "_rounds", ())) > 1:
        text += f" [{row[key + '_min']:.2f}-{row[key + '_max']:.2f}]"
    return text


#: Fewer messages than this per TCP data segment sent: the writes were not coalesced.
SEGMENT_FEW = 4.0


def segment_note(rows: list[dict[str, Any]]) -> list[str]:
    """A note under a table where a client's small writes went out one segment each."""
    few = []
    for r in rows:
        per = r.get("ops_per_seg_out_rounds") or []
        n = sum(1 for x in per if x < SEGMENT_FEW)
        if n and WORKLOADS[r["workload"]].size < 4096 and r["workload"] != "W1":
            few.append(f"{r['client']} in {n} of {len(per)} round(s)")
    if not few:
        return []
    return [
        "",
        f"Fewer than {SEGMENT_FEW:.0f} messages per TCP segment sent: "
        + ", ".join(few)
        + ". Such a round measures the loopback's per-segment cost as much as the client: the "
        "same client runs 2-3x faster in rounds where its writes coalesce (benchmarks/README.md, "
        "'Why picows' figures swing').",
    ]


def with_range(row: dict[str, Any], key: str) -> str | None:
    """``"12.3 [10.1-15.0]"``: a median figure and its min-max over the rounds."""
    if row.get(key) is None:
        return None
    value = row[key]
    if float(value).is_integer() and all(
        float(row.get(key + k, 0) or 0).is_integer() for k in ("_min", "_max")
    ):
        fmt = ".0f"  # counts: sockets, frames
    else:
        fmt = ".0f" if abs(value) >= 100 else ".2f" if abs(value) < 10 else ".1f"
    text = format(value, fmt)
    lo, hi = row.get(key + "_min"), row.get(key + "_max")
    if row.get("runs", 0) > 1 and lo is not None and hi is not None and lo != hi:
        text += f" [{format(lo, fmt)}-{format(hi, fmt)}]"
    return text


def rate_spread(row: dict[str, Any]) -> str | None:
    if row.get("runs", 0) < 2 or not row.get("rate"):
        return None
    return f"{100 * (row['rate_max'] - row['rate_min']) / row['rate']:.0f}%"


def invalid_builds(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Client -> why its build was refused (first workload that said so)."""
    out: dict[str, str] = {}
    for r in rows:
        if r.get("invalid"):
            out.setdefault(r["client"], r["invalid"])
    return out


def build_lines(data: dict[str, Any]) -> list[str]:
    """The report header's list of what each client's children had loaded."""
    seen: dict[str, str] = {}
    for r in data["runs"]:
        if "error" not in r and r["client"] not in seen:
            seen[r["client"]] = builds.summary(r["client"], r.get("build"))
    if not seen:
        return []
    bad = invalid_builds(data.get("rows", []))
    lines = ["Builds (what each client's children had loaded):", ""]
    for client in CLIENTS:
        if client in seen:
            mark = f" **INVALID: {bad[client]}; its column has no ratios**" if client in bad else ""
            lines.append(f"- {client}: {seen[client]}{mark}")
    return [*lines, ""]


def report(data: dict[str, Any]) -> str:
    meta = data["meta"]
    rows = data["rows"]
    lines = [
        "# blockws benchmarks",
        "",
        f"{meta['started']}, {meta['seconds']} s; Python {meta['python']}, {meta['platform']}; "
        f"server {meta.get('server', 'benchmarks/server.py (picows)')} "
        f"on CPU {meta['cpus']['server']}, clients on CPU {meta['cpus']['client']} "
        "(W1: both on the client's CPU). "
        f"{meta['rounds']} round(s), counts x{meta['scale']}, budget {meta['budget_s']} s per "
        "measurement; medians.",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in meta["packages"].items()) + ".",
        "",
        *(
            [
                f"**Taken with --jobs {meta['jobs']}: children ran concurrently; the figures "
                "mean nothing.**",
                "",
            ]
            if meta.get("jobs", 1) > 1
            else []
        ),
        *build_lines(data),
        "`x peer`: ratio to the best peer (websocket-client with or without wsaccel, websockets "
        "sync, picows); `x threaded`: to the best threaded peer (the targets' reference); "
        "`x picows`: to picows; `x TCP`: to the plain-TCP ceiling. Each ratio is the median of "
        "the per-round ratios (rounds are interleaved: round k of every client ran back to back), "
        "with their [min-max] over the rounds beside it; a rate's `spread` is (max - min) / median "
        "of its rounds. `msgs/seg` is messages per TCP data segment the client sent (out) and "
        "received (in): a client whose small writes each leave as their own segment pays the "
        "loopback's TCP path per message (see benchmarks/README.md). CPU % is of one core. `ops` "
        "is the median count done (a long run stops at the budget).",
    ]
    for wname, w in WORKLOADS.items():
        ws = [r for r in rows if r["workload"] == wname]
        if not ws:
            continue
        lines += ["", f"## {wname}: {w.title} ({w.metric})", ""]
        if w.target:
            lines += [f"Target for blockws: {w.target}.", ""]
        if w.why_only:
            lines += [f"Measured for {', '.join(w.clients)} only ({w.why_only}).", ""]
        if wname == "W8":
            lines += [
                "Per client: messages delivered in the measured window (and as % of those the "
                "server was asked for), the process's CPU per message (every thread), the time "
                "one `update_all()` took per frame, frames that overran 1/60 s, each message's "
                "delay from the server's write to its callback, and `update_all()` with nothing "
                "pending: the mean of 1,000 calls at this socket count, one call's p99, and the "
                "mean before any socket was opened. `stalled`: rounds whose frame loop was "
                "still inside one `update_all()` 10 s after the window's end, when the server "
                "ends the streams (so that the call returns). [min-max] over the rounds.",
                "",
            ]
        cells = []
        for r in ws:
            cell = dict(r)
            cell["target_met"] = yes_no(r.get("target_met"))
            for key in RATIO_KEYS:
                cell[key] = with_spread(r, key)
            cell["spread"] = rate_spread(r)
            if r.get("errors"):
                cell["client"] = f"{r['client']} ({len(r['errors'])} failed)"
            if r.get("invalid"):
                cell["client"] = f"{cell['client']} **INVALID build**"
            cells.append(cell)
        if wname == "W8":
            for cell in cells:
                for key in W8_KEYS:
                    cell[key] = with_range(cell, key)
            cols = [
                ("client", "client", "s"),
                ("sockets", "sockets", "s"),
                ("sockets_open", "opened", "s"),
                ("rate", "msgs/s", ",.0f"),
                ("delivered_pct", "delivered %", ".1f"),
                ("cpu_us_per_op", "CPU us/msg", ".1f"),
                ("client_cpu_pct", "client CPU %", ".0f"),
                ("frame_p50_us", "update_all() p50 us", "s"),
                ("frame_p99_us", "update_all() p99 us", "s"),
                ("frame_max_us", "max us", "s"),
                ("late_frames", "late frames", "s"),
                ("stalled", "stalled", "s"),
                ("lat_p50_us", "delay p50 us", "s"),
                ("lat_p99_us", "delay p99 us", "s"),
                ("idle_update_all_us", "idle update_all() us", "s"),
                ("idle_update_all_p99_us", "idle p99 us", "s"),
                ("idle_update_all_us_no_sockets", "idle, no sockets, us", "s"),
                ("target_met", "idle < 2 us", "s"),
                ("rss_kb_per_conn", "kB/socket", ".1f"),
                ("threads_open", "threads", ".0f"),
                ("server_cpu_pct", "server CPU %", ".0f"),
            ]
        elif wname == "W7":
            cols = [
                ("client", "client", "s"),
                ("rate", "conns/s", ",.0f"),
                ("open_s", "open s", ".2f"),
                ("close_s", "close s", ".2f"),
                ("rss_open_mb", "RSS open MB", ".1f"),
                ("rss_kb_per_conn", "kB/conn", ".1f"),
                ("threads_open", "threads", ".0f"),
                ("x_best_peer", "x peer", "s"),
                ("x_best_threaded", "x threaded", "s"),
                ("target_met", "target met", "s"),
                ("cpu_us_per_op", "client CPU us/conn", ".0f"),
                ("server_cpu_pct", "server CPU %", ".0f"),
                ("ops", "conns", ".0f"),
            ]
        else:
            cols = [
                ("client", "client", "s"),
                ("rate", w.metric, ",.1f" if w.metric == "MB/s" else ",.0f"),
                ("spread", "spread", "s"),
                ("x_best_peer", "x peer", "s"),
                ("x_best_threaded", "x threaded", "s"),
                ("x_picows", "x picows", "s"),
                ("target_met", "target met", "s"),
                ("x_tcp", "x TCP", "s"),
                ("ops_per_seg_out", "msgs/seg out", ".1f"),
                ("ops_per_seg_in", "msgs/seg in", ".1f"),
            ]
            if wname == "W1":
                cols += [("p50_us", "p50 us", ".1f"), ("p99_us", "p99 us", ".1f")]
            cols += [
                ("cpu_us_per_op", "client CPU us/op", ".2f"),
                ("client_cpu_pct", "client CPU %", ".0f"),
                ("server_cpu_pct", "server CPU %", ".0f"),
                ("peak_rss_mb", "peak RSS MB", ".0f"),
                ("ops", "ops", ",.0f"),
            ]
        lines.append(table(cells, cols))
        lines += segment_note(ws)
    if data.get("headroom"):
        lines += [
            "",
            "## Server headroom: the probe against the best real client",
            "",
            "The probe sends pre-built frames and only counts bytes; where it beats every real "
            "client, the server is not what limits them. A tie where the best client is already "
            "at the plain-TCP ceiling means the loopback itself is the limit.",
            "",
            table(
                [{**h, "ok": headroom_verdict(h)} for h in data["headroom"]],
                [
                    ("workload", "workload", "s"),
                    ("probe", "probe", ",.0f"),
                    ("best_client", "best client", "s"),
                    ("best", "its figure", ",.0f"),
                    ("ratio", "probe / best", ".2f"),
                    ("probe_server_cpu_pct", "server CPU % (probe)", ".0f"),
                    ("best_server_cpu_pct", "server CPU % (best)", ".0f"),
                    ("best_x_tcp", "best x TCP", ".2f"),
                    ("ok", "server not the bottleneck", "s"),
                ],
            ),
        ]
    if data.get("gameloop"):
        from .gameloop import report as gameloop_report

        lines += ["", gameloop_report(data["gameloop"])]
    failures = [r for r in data["runs"] if "error" in r]
    if failures:
        lines += ["", "## Failed measurements", ""]
        for r in failures:
            last = r["error"].strip().splitlines()[-1] if r["error"].strip() else "?"
            lines.append(f"- {r['workload']} {r['client']} round {r['round'] + 1}: {last}")
    return "\n".join(lines) + "\n"


def write(path: str | None, text: str) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


# -- profiling one child -------------------------------------------------------------------


def profile(args: argparse.Namespace) -> None:
    import pstats

    client, _, wname = args.profile.partition(":")
    if client not in CLIENTS or wname not in WORKLOADS:
        raise SystemExit("--profile CLIENT:WORKLOAD, e.g. blockws-cb:W4")
    w = WORKLOADS[wname]
    server_cpu, client_cpu = cpu_plan()
    ports = (free_port(), free_port())
    out = os.path.join(tempfile.gettempdir(), f"blockws-bench-{client}-{wname}.prof")
    cmd = server_cmd(args.server, ports)
    with tempfile.NamedTemporaryFile(suffix=".log") as errlog:
        with server(cmd, ports[0], log=errlog.name) as proc:
            pin(proc.pid, {client_cpu} if w.same_cpu else {server_cpu})
            cargs = child_args(
                client, wname, scaled_count(w, args.scale), ports, proc.pid, client_cpu,
                args.budget,
            )  # fmt: skip
            r = run_child(
                "benchmarks",
                [*cargs, "--profile-out", out],
                timeout=args.budget * 10 + 120,
                env=CLIENTS[client].env,
            )
    print(progress({**r, "round": 0}, r["elapsed"]), "(under cProfile: slower than usual)")
    print(f"profile of every thread: {out}")
    pstats.Stats(out).sort_stats("tottime").print_stats(30)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        from .clients import child

        print(json.dumps(child(args)))
        return
    if args.profile:
        profile(args)
        return
    data = measure(args)
    data["rows"] = summarize(data)
    data["headroom"] = headroom(data["rows"])
    text = report(data)
    print(text)
    write(args.md, text)
    write(args.json, json.dumps(data, indent=1, default=str))
    if args.json:
        log(args, f"results: {args.json}" + (f", {args.md}" if args.md else ""))
    bad = invalid_builds(data["rows"])
    if bad:
        for client, why in bad.items():
            print(f"benchmarks: {client} did not run its compiled build: {why}", file=sys.stderr)
        if not args.allow_uncompiled:
            print(
                "benchmarks: refusing these columns (no ratios in the report); exit status 3. "
                "--allow-uncompiled exits 0 (the columns stay without ratios).",
                file=sys.stderr,
            )
            raise SystemExit(3)


if __name__ == "__main__":
    main()
