"""``python -m benchmarks.fuzz``: run the fuzz targets (see ``__init__``'s docstring)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

NAMES = ("frames", "protocol", "handshake", "extensions", "inflate", "http2")
ROOT = Path(__file__).resolve().parents[2]


def _child(target: str, libfuzzer_args: list[str], corpus: str) -> None:
    """Run one target under atheris in this process (never returns)."""
    import atheris

    # Instrument blockws (the code under test), not the harness or h2.
    with atheris.instrument_imports(include=["blockws"]):
        import blockws  # noqa: F401
        import blockws.deflate  # noqa: F401
        import blockws.handshake  # noqa: F401
        import blockws.http2  # noqa: F401
        import blockws.protocol  # noqa: F401
    from benchmarks.fuzz.h2 import hold_timer
    from benchmarks.fuzz.targets import TARGETS

    hold_timer()
    atheris.Setup([sys.argv[0], *libfuzzer_args, corpus], TARGETS[target])
    # What is alive now lives to the end: full collections need not scan it again
    # (the http2 target leaves cyclic garbage, h2's connections, with every input).
    gc.freeze()
    atheris.Fuzz()


def _fallback(target: str, runs: int | None, seconds: float | None) -> tuple[int, float, str]:
    """Random mutation of the seeds, when atheris is missing: not coverage-guided."""
    from benchmarks.fuzz.h2 import hold_timer
    from benchmarks.fuzz.targets import TARGETS, seeds

    hold_timer()
    fn = TARGETS[target]
    pool = seeds(target)
    rng = random.Random(1)
    start = time.perf_counter()
    n = 0
    while (runs is None or n < runs) and (
        seconds is None or time.perf_counter() - start < seconds
    ):
        data = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 8)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif op == 1:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif op == 2:
                del data[pos : pos + rng.randint(1, 8)]
            else:
                other = rng.choice(pool)
                cut = rng.randrange(len(other) + 1)
                data[pos:] = other[cut:]
        try:
            fn(bytes(data))
        except Exception:
            out = ROOT / ".fuzz" / target
            out.mkdir(parents=True, exist_ok=True)
            crash = out / f"crash-fallback-{n}"
            crash.write_bytes(bytes(data))
            return n, time.perf_counter() - start, f"{traceback.format_exc()}\ninput: {crash}"
        n += 1
    return n, time.perf_counter() - start, ""


def _run(target: str, args: argparse.Namespace) -> bool:
    """Fuzz one target in a child process; prints a summary line; True if no crash."""
    artifacts = ROOT / ".fuzz" / target
    artifacts.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("atheris") is None or args.no_atheris:
        n, took, crash = _fallback(target, args.runs, args.seconds)
        print(f"{target}: {n} inputs in {took:.1f} s ({n / max(took, 1e-9):.0f}/s), "
              f"random mutation, not coverage-guided ("
              + ("--no-atheris" if args.no_atheris else "atheris is not installed") + ")"
              + (f", CRASH\n{crash}" if crash else ", no crash"), flush=True)
        return not crash
    from benchmarks.fuzz.targets import seeds

    with contextlib.ExitStack() as stack:
        if args.corpus_dir:
            # A corpus kept across runs: a long campaign may go on where it stopped.
            corpus = str(Path(args.corpus_dir, target))
            Path(corpus).mkdir(parents=True, exist_ok=True)
        else:
            corpus = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-"))
        for i, seed in enumerate(seeds(target)):
            Path(corpus, f"seed-{i}").write_bytes(seed)
        flags = [f"-rss_limit_mb={args.rss_limit_mb}", f"-max_len={args.max_len}",
                 f"-artifact_prefix={artifacts}/", "-print_final_stats=1"]
        if args.runs is not None:
            flags.append(f"-runs={args.runs}")
        if args.seconds is not None:
            flags.append(f"-max_total_time={int(args.seconds)}")
        cmd = [sys.executable, "-m", "benchmarks.fuzz", "--child", target, "--corpus", corpus,
               *[f"--libfuzzer={flag}" for flag in flags]]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        took = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    (artifacts / "last.log").write_text(log)
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    speed = re.findall(r"stat::average_exec_per_sec:\s*(\d+)", log)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    ok = proc.returncode == 0
    # SIGINT to the child (stopping a long campaign): libFuzzer prints its stats
    # and exits 72, or Python's handler gets it first ("KeyboardInterrupt:
    # stopping.", 130). That is the end of a run, not a crash.
    interrupted = bool(re.search(r"libFuzzer: run interrupted|^KeyboardInterrupt: stopping",
                                 log, re.M)) and not re.search(
        r"ERROR: libFuzzer|Uncaught Python exception", log)
    outcome = ("no crash" if ok else "interrupted, no crash" if interrupted
               else f"CRASH (exit {proc.returncode})")
    print(f"{target}: {runs[-1] if runs else '?'} inputs in {took:.0f} s "
          f"({speed[-1] if speed else '?'}/s), coverage-guided (atheris), "
          f"{'cov ' + cov[-1][0] + ' ft ' + cov[-1][1] if cov else ''}, {outcome}", flush=True)
    if interrupted:
        return True
    if not ok:
        tail = log[-4000:]
        print(tail, file=sys.stderr)
        print(f"full log: {artifacts / 'last.log'}", file=sys.stderr)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__)
    parser.add_argument("--target", default="all", help=f"one of {', '.join(NAMES)}, or all")
    parser.add_argument("--runs", type=int, help="inputs per target")
    parser.add_argument("--seconds", type=float, help="seconds per target")
    parser.add_argument("--rss-limit-mb", type=int, default=1024)
    parser.add_argument("--max-len", type=int, default=8192, help="largest input, bytes")
    parser.add_argument("--no-atheris", action="store_true", help="random mutation only")
    parser.add_argument("--corpus-dir", metavar="DIR",
                        help="keep each target's corpus in DIR/TARGET and start from what is "
                        "there (default: a fresh one per run, seeds only, deleted after)")
    parser.add_argument("--replay", metavar="FILE", help="run one saved input of --target")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--libfuzzer", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.libfuzzer, args.corpus)
        return 0
    names = NAMES if args.target == "all" else tuple(args.target.split(","))
    for name in names:
        if name not in NAMES:
            parser.error(f"unknown target {name!r}; choose from {', '.join(NAMES)}")
    if args.replay:
        from benchmarks.fuzz.targets import TARGETS

        TARGETS[names[0]](Path(args.replay).read_bytes())
        print("no failure")
        return 0
    if args.runs is None and args.seconds is None:
        args.seconds = 60.0
    failed = [name for name in names if not _run(name, args)]
    if failed:
        print(f"crashes in: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
