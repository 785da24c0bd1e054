"""The fuzz targets (``benchmarks/fuzz``, issue 11): the inputs that found bugs, and a smoke.

The unit tests run every target on its seeds and on each input the fuzzer stopped at.
Five found bugs (the first four also have a regression test of their own beside the
code they fixed; each input fails its target on the code before its fix); one found an
oracle that was too strict (``protocol``), kept so that it stays right. The smoke runs each target
under atheris for ``BLOCKWS_FUZZ_SECONDS`` (default 60) seconds in a child process, two
targets at a time (CI machines have two cores; six targets take three minutes): it is a
smoke; the issue's full run is ``python -m benchmarks.fuzz --runs 10000000``.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.fuzz.inputs import pieces
from benchmarks.fuzz.targets import TARGETS, seeds

ROOT = Path(__file__).resolve().parents[1]
SECONDS = float(os.environ.get("BLOCKWS_FUZZ_SECONDS", "60"))
#: Targets fuzzed at once by the smoke.
PARALLEL = 2

#: (target, input) pairs that failed before the fixes, in base64 as libFuzzer printed them.
FOUND = [
    # A head of exactly `limit` bytes: HeadersTooLarge when cut inside its blank line.
    ("handshake", "QEBUYSRlOiBja2V0JiYmJiYv2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ"
                  "U29ja2V0LVBykYuQnJCTxdhjaGF0DXBlcm1lc3NhZ2UtZGVmbGF0ZTsgc2VydmVyX21heF93aW5pbm"
                  "Rvd19iaXRzPTEyDQoNCoECaGk="),
    # "HTTP/1.1 ¹01": a bare ValueError from int().
    ("handshake", "PUBIVFRQLzEuMSC5MDEgU3cNCg0KgSA="),
    # Deflate data that is bad twice over: which error comes first depends on the cut (the
    # oracle was too strict; kept so it stays right).
    ("protocol", "EcGLAQIDBMtKzs3I//9Vy0SRAgM="),
    # DATA through h2 followed by a bad RST_STREAM in one read: the DATA was dropped.
    ("http2", "AAAyAQCBAAgABmjDqWxsbwAAAQAAAGSCfgDIAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gIS"
              "IjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0+P0BBQkNERUZHSElKS0xNTk9QUVxTVFVWV1hZWltcXV5f"
              "AAABAAAAaGBhYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ent8fX5/gIGCg4SFhoeIiYqLjI2Otba3uLm6u7y9"
              "vr/AwcLDxMXGxwA="),
    # An empty DATA with END_STREAM: a credit of 0 made h2 raise ValueError in the reader.
    ("http2", "AAABAgAAAAABAwAACIEGCIEGaMOpbGxvACQBAAAACIEGaMOpbGxvAA=="),
    # A GOAWAY on a stream (a connection error of ours) after a padded DATA in the same
    # read: the DATA was fed to h2, so delivered, twice.
    ("http2", "AAABAwAACAAAAAAAAQMAAAiBBmjDqWxsbwAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
              "aMMAAAEDAAAIgQZow6lsbG8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAGjDgQZow6ls"
              "bG8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAGjDe6l7gQZow6lsbG8AAAAAAKkAAAAA"
              "AAAAAAAAAAAAAAAAAAD///////////////////////////////////////////////////////8AAAAAAAAA"
              "AwAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAQAAAAAAAAAA"
              "AAAAAAAAAABsbG8AAAEAAAAIgQZow6lsbG8A"),
]


@pytest.mark.unit
@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_passes_its_seeds(target: str) -> None:
    inputs = seeds(target)
    assert inputs
    for data in inputs:
        TARGETS[target](data)


@pytest.mark.unit
@pytest.mark.timeout(30)
@pytest.mark.parametrize(("target", "encoded"), FOUND, ids=[f"{t}-{i}" for i, (t, _) in
                                                           enumerate(FOUND)])
def test_found_inputs_pass(target: str, encoded: str) -> None:
    TARGETS[target](base64.b64decode(encoded))


def _fuzz(target: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.fuzz", "--target", target, "--seconds", str(SECONDS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=SECONDS + 80,
    )


@pytest.fixture(scope="module")
def smoke_runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every target's smoke, ``PARALLEL`` at a time; the first test to ask waits for all."""
    names = sorted(TARGETS)
    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(zip(names, pool.map(_fuzz, names)))


# The first test's timeout covers the module fixture that runs every target.
@pytest.mark.timeout(-(-len(TARGETS) // PARALLEL) * (SECONDS + 80) + 60)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_smoke(target: str, smoke_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    proc = smoke_runs[target]
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "no crash" in proc.stdout
    # The run went on for the time asked, not stopping at once ("N inputs in T s").
    took = re.search(r"inputs in (\d+(?:\.\d+)?) s", proc.stdout)
    assert took is not None and float(took.group(1)) >= SECONDS * 0.9, proc.stdout


@pytest.mark.unit
@pytest.mark.timeout(60)
@pytest.mark.parametrize("ending", ["close", "stream", "server"])
def test_http2_copies_behave_as_opened(ending: str) -> None:
    """The http2 target runs on copies of one connection opened once (a pickle round trip:
    opening costs three times as much); a copy must behave as a connection opened for real,
    on every seed and found input, whole and cut, with each ending."""
    from benchmarks.fuzz import h2 as harness

    def data(n: int) -> bytes:  # a DATA frame of n bytes in the target's choices
        return bytes([0, 1, 0, 0, n >> 8, n & 255]) + bytes(n) + b"\x00"

    inputs = seeds("http2") + [base64.b64decode(e) for t, e in FOUND if t == "http2"]
    inputs += [b"\x00" + data(280) + data(280), b"\x07" + data(280) + data(280)]  # windows
    for data in inputs:
        plan = harness._plan(data)
        assert plan is not None
        for reads in ([plan.stream], list(pieces(plan.stream, plan.cuts))):
            copied = harness._run_h2(reads, plan.windows, ending)
            opened = harness._run_h2(reads, plan.windows, ending, copy=False)
            assert copied == opened, (data, reads)
