"""Smoke test of the benchmark harness (``python -m benchmarks``) with the smallest counts.

It checks that the harness runs end to end -- the server, every client on
every workload in fresh subprocesses, the game-loop measurements, the JSON
and Markdown output -- not the figures, which are never asserted. Then the
build check (``benchmarks/builds.py``): a column whose child did not run its
compiled build gets no ratios and the run exits 3; and the summary's
per-round ratios with their spread.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import builds  # noqa: E402
from benchmarks.__main__ import report, segment_note, summarize  # noqa: E402
from benchmarks.clients import tcp_data_segments  # noqa: E402
from benchmarks.workloads import CLIENTS, WORKLOADS  # noqa: E402


def runs_on(workload: str, client: str) -> bool:
    only = WORKLOADS[workload].clients
    return not only or client in only


def harness(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[Any, Any, str]:
    """Run ``python -m benchmarks ARGS``; (process, JSON data, Markdown)."""
    out_json, out_md = tmp_path / "results.json", tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, "--quiet",
         "--json", str(out_json), "--md", str(out_md)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )  # fmt: skip
    data = json.loads(out_json.read_text()) if out_json.exists() else None
    md = out_md.read_text() if out_md.exists() else ""
    return proc, data, md


@pytest.mark.timeout(240)
def test_harness_produces_a_row_for_every_client_and_workload(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "results.json", tmp_path / "results.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--smoke",
            "--quiet",
            "--json",
            str(out_json),
            "--md",
            str(out_md),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode in (0, 3), proc.stderr[-4000:]
    data = json.loads(out_json.read_text())

    failed = [
        f"{r['workload']} {r['client']}: {r['error'][-600:]}" for r in data["runs"] if "error" in r
    ]
    assert not failed, "\n".join(failed)
    # websocket-client is measured without and with wsaccel, as labelled.
    accel = {r["wsaccel"] for r in data["runs"] if r["client"] == "websocket-client+wsaccel"}
    plain = {r["wsaccel"] for r in data["runs"] if r["client"] == "websocket-client"}
    assert accel == {True} and plain == {False}
    rows = {(r["workload"], r["client"]): r for r in data["rows"]}
    missing = [(w, c) for w in WORKLOADS for c in CLIENTS if runs_on(w, c) and (w, c) not in rows]
    assert not missing
    # W8 is blockws only, and says so
    assert {c for w, c in rows if w == "W8"} == set(WORKLOADS["W8"].clients)
    # every child reported its build, and every build here is the one its column names
    # (but blockws' own C speedup, where this install could not build it)
    assert all("build" in r for r in data["runs"])
    refused = {c for (w, c), r in rows.items() if r.get("invalid")}
    if builds.is_compiled(_speedups_file()):
        assert not refused and proc.returncode == 0
    else:
        assert refused == {"blockws-cb", "blockws-recv"} and proc.returncode == 3
    for (workload, client), row in rows.items():
        assert row["runs"] == 1, (workload, client)
        for key in ("rate", "cpu_us_per_op", "client_cpu_pct", "server_cpu_pct", "peak_rss_mb"):
            assert key in row, (workload, client, key)
        if client != "tcp" and workload != "W8" and client not in refused:  # W8: no peer
            assert "x_tcp" in row and "x_best_peer" in row, (workload, client)
    for client in CLIENTS:
        assert "p50_us" in rows["W1", client] and "p99_us" in rows["W1", client]
        assert "threads_open" in rows["W7", client] and "rss_open_mb" in rows["W7", client]
        assert "rss_kb_per_conn" in rows["W7", client]
    for workload in WORKLOADS:
        assert "target" in rows[workload, "blockws-cb"] or "blockws-cb" in refused
    w8 = rows["W8", "blockws-cb"]
    assert w8["ops"] > 0 and w8["frames"] > 0 and w8["sockets"] == WORKLOADS["W8"].min_count
    for key in ("frame_p50_us", "frame_p99_us", "idle_update_all_us", "cpu_us_per_op"):
        assert key in w8, key
    assert {h["workload"] for h in data["headroom"]} == set(WORKLOADS) - {"W8"}

    tests = [r.get("test") for r in data["gameloop"]]
    errors = [r["error"][-600:] for r in data["gameloop"] if "error" in r]
    assert not errors, "\n".join(errors)
    assert tests.count("idle") == 1 and tests.count("latency") == 4 and tests.count("overrun") == 9
    costs = [r for r in data["gameloop"] if r.get("test") == "cost"]
    assert [r["mode"] for r in costs] == ["count", "loads"]
    assert all(r["msgs"] > 0 and r["msgs"] == r["sent"] and r["us_per_msg"] > 0 for r in costs)

    md = out_md.read_text()
    for name in WORKLOADS:
        assert f"## {name}:" in md
    assert "Game-loop fitness" in md and "Server headroom" in md
    assert "CPU per message of the JSON load" in md
    assert "Builds (what each client's children had loaded)" in md
    assert "blockws only" in md


@pytest.mark.timeout(120)
def test_a_column_without_its_compiled_build_is_refused(tmp_path: Path) -> None:
    # BLOCKWS_PURE_PYTHON=1 in the parent reaches every child: blockws-cb then
    # runs without the C speedup its column claims, while picows is unaffected.
    if not builds.is_compiled(_speedups_file()):
        pytest.skip("blockws' C speedup is not built here")
    proc, data, md = harness(
        tmp_path,
        *("--smoke", "--no-gameloop", "--clients", "blockws-cb,picows", "--workloads", "W5"),
        env={"BLOCKWS_PURE_PYTHON": "1"},
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "blockws-cb did not run its compiled build" in proc.stderr
    rows = {r["client"]: r for r in data["rows"]}
    assert "blockws-speedups" in rows["blockws-cb"]["invalid"]
    assert not [k for k in rows["blockws-cb"] if k.startswith("x_")]
    assert "invalid" not in rows["picows"] and rows["picows"]["x_best_peer"] == 1.0
    assert "blockws-cb **INVALID build**" in md and "INVALID: blockws-speedups" in md


@pytest.mark.timeout(240)
def test_the_node_server_serves_every_client_on_w1_to_w7(tmp_path: Path) -> None:
    # benchmarks/server.js, the server with headroom: the same endpoints and
    # replies as server.py for W1-W7. Each child checks what it got back (the
    # echoes, the flood's count, the sink's "COUNT BYTES"), so a run without
    # errors is a run the Node server answered as server.py does.
    workloads = [w for w in WORKLOADS if w != "W8"]
    proc, data, md = harness(
        tmp_path, "--server", "node", "--smoke", "--workloads", ",".join(workloads)
    )
    assert proc.returncode in (0, 3), proc.stderr[-4000:]
    failed = [
        f"{r['workload']} {r['client']}: {r['error'][-600:]}" for r in data["runs"] if "error" in r
    ]
    assert not failed, "\n".join(failed)
    rows = {(r["workload"], r["client"]) for r in data["rows"]}
    assert rows == {(w, c) for w in workloads for c in CLIENTS}
    assert data["meta"]["server"].startswith("benchmarks/server.js (Node.js v")
    assert "server benchmarks/server.js (Node.js v" in md
    assert data["gameloop"] == []  # its /stream endpoint is server.py's alone


@pytest.mark.timeout(60)
def test_the_node_server_has_no_w8(tmp_path: Path) -> None:
    proc, data, _ = harness(tmp_path, "--server", "node", "--smoke", "--workloads", "W8")
    assert proc.returncode != 0 and data is None
    assert "no /pulse endpoint for W8" in proc.stderr


def _speedups_file() -> str | None:
    try:
        from blockws import _speedups
    except ImportError:
        return None
    return _speedups.__file__


# -- socket- and process-free checks ---------------------------------------------------


def _good_build(client: str) -> dict[str, dict[str, Any]]:
    ok = {"loaded": True, "compiled": True, "in_use": True, "module": "m", "file": "m.so"}
    off = {"loaded": False, "compiled": False, "in_use": False, "module": "m", "file": None}
    return {c: dict(ok) for c in builds.REQUIRES.get(client, ())} | {
        c: dict(off) for c in builds.FORBIDS.get(client, ())
    }


@pytest.mark.unit
def test_build_problems_name_what_is_missing_or_wrongly_in_use() -> None:
    for client in [*CLIENTS, "blockws", "websockets", "aiohttp"]:  # + benchmarks/deflate.py's
        assert builds.problems(client, _good_build(client)) == [], client
    assert builds.problems("aiohttp", {}) == ["aiohttp-speedups: not reported"]
    b = _good_build("picows")
    b["aiofastnet"]["in_use"] = False
    assert builds.problems("picows", b) == ["aiofastnet: loaded but not used by the client"]
    b = _good_build("websockets-sync")
    b["websockets-speedups"].update(compiled=False, file="speedups.py")
    assert builds.problems("websockets-sync", b) == [
        "websockets-speedups: not a compiled build (speedups.py)"
    ]
    b = _good_build("websocket-client+wsaccel")
    b["wsaccel"]["loaded"] = False
    assert builds.problems("websocket-client+wsaccel", b)[0].startswith("wsaccel: not loaded")
    assert builds.problems("blockws-recv", None) == ["blockws-speedups: not reported"]
    b = _good_build("blockws-pure")
    b["blockws-speedups"].update(loaded=True, compiled=True, in_use=True)
    assert builds.problems("blockws-pure", b) == [
        "blockws-speedups: in use, but this column is measured without it"
    ]
    assert builds.is_compiled("/x/picows.cpython-311-x86_64-linux-gnu.so")
    assert not builds.is_compiled("/x/picows.py") and not builds.is_compiled(None)


@pytest.mark.unit
def test_build_probe_sees_blockws_masking_in_use() -> None:
    import blockws.frames

    got = builds.probe("blockws-cb")["blockws-speedups"]
    in_use = blockws.frames.apply_mask is blockws.frames.c_apply_mask
    assert got["in_use"] is in_use
    assert got["compiled"] is builds.is_compiled(_speedups_file())


def _run(client: str, rnd: int, ops_per_s: float, build: Any = None) -> dict[str, Any]:
    return {
        "workload": "W5",
        "client": client,
        "round": rnd,
        "ops": int(ops_per_s),
        "bytes": 0,
        "elapsed": 1.0,
        "cpu": 0.5,
        "server_cpu": 0.1,
        "maxrss_kb": 1024,
        "requested": 10,
        "build": _good_build(client) if build is None else build,
    }


@pytest.mark.unit
def test_ratios_are_medians_of_paired_rounds_with_their_spread_and_skip_invalid_columns() -> None:
    # picows is twice as fast in round 0, half as fast in round 2: the per-round
    # ratios of blockws-cb are 0.5, 1.0, 2.0. websockets-sync ran pure: refused.
    runs = [
        _run("blockws-cb", 0, 100), _run("picows", 0, 200), _run("websockets-sync", 0, 1e9,
                                                                   build={}),
        _run("blockws-cb", 1, 100), _run("picows", 1, 100), _run("websockets-sync", 1, 1e9,
                                                                   build={}),
        _run("blockws-cb", 2, 100), _run("picows", 2, 50), _run("websockets-sync", 2, 1e9,
                                                                  build={}),
    ]  # fmt: skip
    rows = {r["client"]: r for r in summarize({"runs": runs})}
    cb = rows["blockws-cb"]
    assert cb["x_best_peer_ref"] == "picows" and cb["x_picows_ref"] == "picows"
    assert cb["x_best_peer_rounds"] == [0.5, 1.0, 2.0]
    assert (cb["x_best_peer"], cb["x_best_peer_min"], cb["x_best_peer_max"]) == (1.0, 0.5, 2.0)
    assert rows["picows"]["rate_min"] == 50 and rows["picows"]["rate_max"] == 200
    # the refused column neither has ratios nor is anyone's reference (it was 1e9 msgs/s)
    ws = rows["websockets-sync"]
    assert "websockets-speedups: not reported" in ws["invalid"]
    assert not [k for k in ws if k.startswith("x_")]
    assert "x_best_threaded" not in cb
    data = {
        "meta": {"started": "t", "seconds": 1, "python": "3", "platform": "p",
                 "cpus": {"server": 0, "client": 1}, "rounds": 3, "scale": 1, "budget_s": 1,
                 "packages": {}},
        "runs": runs, "rows": list(rows.values()),
    }  # fmt: skip
    md = report(data)
    assert "| blockws-cb | 100 | 0% | 1.00 [0.50-2.00] |" in md
    assert "websockets-sync **INVALID build**" in md


@pytest.mark.timeout(20)
def test_tcp_data_segments_counts_this_process_sockets_to_a_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s, _ = listener.accept()
            with s:
                before = tcp_data_segments(port)
                for _ in range(3):
                    c.sendall(b"x" * 10)
                    assert s.recv(100)  # one write, one segment: it is read before the next
                s.sendall(b"y")
                assert c.recv(10) == b"y"
                seg_in, seg_out = tcp_data_segments(port)
    assert seg_out - before[1] == 3 and seg_in - before[0] == 1


@pytest.mark.unit
def test_a_round_whose_small_writes_went_out_one_segment_each_is_pointed_out() -> None:
    rows = [
        {"workload": "W5", "client": "picows", "ops_per_seg_out_rounds": [1.3, 88.0, 1.1]},
        {"workload": "W5", "client": "blockws-cb", "ops_per_seg_out_rounds": [800.0] * 3},
    ]
    note = " ".join(segment_note(rows))
    assert "picows in 2 of 3 round(s)" in note and "blockws-cb" not in note
    rows[0]["workload"] = rows[1]["workload"] = "W5b"  # 1 MiB messages span many segments
    assert segment_note(rows) == []


@pytest.mark.timeout(60)
def test_build_probe_tells_aiohttp_with_and_without_its_extensions() -> None:
    pytest.importorskip("aiohttp")
    code = (
        "import json, aiohttp, aiohttp.http_websocket; from benchmarks import builds; "
        "print(json.dumps(builds.probe('aiohttp')['aiohttp-speedups']))"
    )

    def probe(**env: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=50,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            check=True,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    with_ext = probe()
    if not with_ext["compiled"]:
        pytest.skip("this aiohttp has no compiled extensions")
    assert with_ext["in_use"] and builds.problems("aiohttp", {"aiohttp-speedups": with_ext}) == []
    without = probe(AIOHTTP_NO_EXTENSIONS="1")
    assert not without["in_use"]
    assert builds.problems("aiohttp", {"aiohttp-speedups": without})


@pytest.mark.timeout(60)
def test_threadcost_prints_the_floor_of_a_thread_per_socket() -> None:
    """``python -m benchmarks.threadcost``: one figure per mode, each from its own child."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.threadcost", "--count", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Python ") and "20 more after 20" in lines[0]
    figures = {}
    for line in lines[1:]:
        mode, _, rest = line.partition(":")
        figures[mode.strip()] = float(rest.split()[0])
    assert set(figures) == {"threading.Thread", "_thread", "socket pair only"}


@pytest.mark.timeout(120)
def test_parse_prints_each_kind_of_message_on_each_loop() -> None:
    """``python -m benchmarks.parse``: a figure per kind of message and loop (the
    C column only when the speedups are built and in use)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.parse", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    built = lines[0].endswith("yes")
    rows = {}
    for line in lines[3:]:
        label, c, py = (cell.strip() for cell in line.strip("|").split("|"))
        rows[label] = (c, py)
    assert set(rows) == {"text", "binary", "compressed text", "compressed binary"}
    for c, py in rows.values():
        assert float(py) > 0 and (float(c) > 0 if built else c == "-")


@pytest.mark.timeout(120)
def test_fragments_prints_faults_and_cpu_for_each_size() -> None:
    """``python -m benchmarks.fragments``: against the benchmark server (picows),
    a row per fragment size with each figure once per round."""
    pytest.importorskip("picows")
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.fragments",
            "--sizes", "32768,2097152", "--rounds", "2", "--messages", "5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("blockws ") and "C speedups in use" in lines[0]
    assert "server CPU a message" in lines[1]
    rows = {}
    for line in lines[2:]:
        size, faults, cpu, server_cpu = re.split(r"\s{2,}", line.strip())
        rows[int(size)] = [
            [float(f) for f in column.split(",")] for column in (faults, cpu, server_cpu)
        ]
    assert set(rows) == {32768, 2097152}
    for faults, cpu, server_cpu in rows.values():
        assert len(faults) == len(cpu) == len(server_cpu) == 2
        assert all(f >= 0 for f in faults) and all(c > 0 for c in cpu + server_cpu)
