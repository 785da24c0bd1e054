"""The soak, short (issue 11): 50 sockets for 60 s against the `websockets` and Node `ws`
echo peers, pings every second, traffic both ways (``benchmarks/soak.py`` has the rules).

It runs in its own process, so that its thread, descriptor and memory figures are its own,
with glibc's default allocator (what users get). The full soak (500 sockets, 10 minutes) is
``python -m benchmarks.soak``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECONDS = float(os.environ.get("BLOCKWS_SOAK_SECONDS", "60"))


@pytest.mark.timeout(SECONDS + 120)
def test_soak_short(websockets_server: str, node_ws_server: str, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--sockets", "50", "--seconds", str(SECONDS),
         "--urls", f"{websockets_server},{node_ws_server}", "--json", str(out), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=SECONDS + 100,
    )
    print(proc.stdout, proc.stderr)
    result = json.loads(out.read_text())
    assert result["sent"] > 0 and result["received"] == result["sent"]
    assert (result["lost"], result["reordered"], result["corrupt"]) == (0, 0, 0)
    assert result["early_closes"] == [] and result["bad_final_closes"] == []
    assert result["readers"] == [50, 50]
    assert result["failures"] == [], result["failures"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
