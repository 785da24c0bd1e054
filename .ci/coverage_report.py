"""Per-module branch coverage of blockws/, from a coverage data file (issue 11).

    python -m pytest --cov=blockws --cov-branch --cov-report=    # writes .coverage
    python .ci/coverage_report.py                                 # the table; exit 0
    python .ci/coverage_report.py --fail-under 95                 # exit 1 if a module is below

The figure per module is coverage.py's own with branch measurement on: covered
statements plus covered branch destinations, over all of them. ``branches`` shows the
branch part alone. The C speedups (``_speedups.c``) are not Python and are not measured.
Without ``--fail-under`` the modules below ``--goal`` (95) are listed, and the exit
status is 0: CI reports the figures without failing on them (.ci/run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import coverage


@dataclass
class Row:
    module: str
    statements: int
    missing: int
    branches: int
    branch_pct: float
    cover: float
    gaps: str  # missing lines, as ranges


def _ranges(lines: list[int]) -> str:
    out: list[str] = []
    for n in sorted(lines):
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


def module_figures(data_file: str) -> list[Row]:
    cov = coverage.Coverage(data_file=data_file)
    cov.load()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "coverage.json")
        cov.json_report(outfile=str(out))  # setup.cfg: source = blockws
        report = json.loads(out.read_text())
    rows = []
    for path, info in report["files"].items():
        summary = info["summary"]
        branches = summary.get("num_branches", 0)
        covered = summary.get("covered_branches", 0)
        partial = sorted({src for src, _ in info.get("missing_branches", [])})
        gaps = _ranges(info["missing_lines"])
        if partial:
            gaps += ("; " if gaps else "") + "partial branches at " + _ranges(partial)
        rows.append(Row(Path(path).name, summary["num_statements"], summary["missing_lines"],
                        branches, 100.0 * covered / branches if branches else 100.0,
                        summary["percent_covered"], gaps))
    return sorted(rows, key=lambda r: r.cover)


def total_cover(data_file: str) -> float:
    """coverage.py's own figure for the whole package (statements and branches)."""
    cov = coverage.Coverage(data_file=data_file)
    cov.load()
    with open(os.devnull, "w") as sink:
        return float(cov.report(file=sink))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-file", default=".coverage")
    parser.add_argument("--goal", type=float, default=95.0)
    parser.add_argument("--fail-under", type=float, help="exit 1 if any module is below")
    args = parser.parse_args(argv)
    if not Path(args.data_file).exists():
        print(f"no coverage data at {args.data_file}", file=sys.stderr)
        return 1
    rows = module_figures(args.data_file)
    threshold = args.fail_under if args.fail_under is not None else args.goal
    print(f"{'module':<16} {'stmts':>6} {'miss':>5} {'branches':>9} {'branch %':>9} {'cover %':>8}")
    for r in rows:
        mark = f"  < {threshold:g}" if r.cover < threshold else ""
        print(f"{r.module:<16} {r.statements:>6} {r.missing:>5} {r.branches:>9} "
              f"{r.branch_pct:>9.1f} {r.cover:>8.1f}{mark}")
    print(f"{'all of blockws/':<16} {sum(r.statements for r in rows):>6} "
          f"{sum(r.missing for r in rows):>5} {sum(r.branches for r in rows):>9} "
          f"{'':>9} {total_cover(args.data_file):>8.1f}  (lowest: {rows[0].module} "
          f"{rows[0].cover:.1f})")
    below = [r.module for r in rows if r.cover < threshold]
    if not below:
        print(f"every module at {threshold:g} % or more")
        return 0
    print(f"{len(below)} module(s) below {threshold:g} %: {', '.join(below)}")
    print("lines not run, by module:")
    for r in rows:
        if r.cover < threshold:
            print(f"  {r.module}: {r.gaps}")
    if args.fail_under is not None:
        return 1
    print("(report only: pass --fail-under to make this a gate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
