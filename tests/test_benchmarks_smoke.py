"""Smoke test of the benchmark harness (``python -m benchmarks``) with the smallest counts.

It checks that the harness runs end to end -- the server, every client on
every workload in fresh subprocesses, the game-loop measurements, the JSON
and Markdown output -- not the figures, which are never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.workloads import CLIENTS, WORKLOADS  # noqa: E402


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
    assert proc.returncode == 0, proc.stderr[-4000:]
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
    missing = [(w, c) for w in WORKLOADS for c in CLIENTS if (w, c) not in rows]
    assert not missing
    for (workload, client), row in rows.items():
        assert row["runs"] == 1, (workload, client)
        for key in ("rate", "cpu_us_per_op", "client_cpu_pct", "server_cpu_pct", "peak_rss_mb"):
            assert key in row, (workload, client, key)
        if client != "tcp":
            assert "x_tcp" in row and "x_best_peer" in row, (workload, client)
    for client in CLIENTS:
        assert "p50_us" in rows["W1", client] and "p99_us" in rows["W1", client]
        assert "threads_open" in rows["W7", client] and "rss_open_mb" in rows["W7", client]
    for workload in WORKLOADS:
        assert "target" in rows[workload, "blockws-cb"]
    assert {h["workload"] for h in data["headroom"]} == set(WORKLOADS)

    tests = [r.get("test") for r in data["gameloop"]]
    errors = [r["error"][-600:] for r in data["gameloop"] if "error" in r]
    assert not errors, "\n".join(errors)
    assert tests.count("idle") == 1 and tests.count("latency") == 3 and tests.count("overrun") == 9

    md = out_md.read_text()
    for name in WORKLOADS:
        assert f"## {name}:" in md
    assert "Game-loop fitness" in md and "Server headroom" in md
