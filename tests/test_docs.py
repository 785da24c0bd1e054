"""The documentation's code runs as written, and the repository basics are in place.

Every Python code block of ``README.md`` and ``docs/**/*.rst`` (```python fences and
``.. code-block:: python`` directives) runs in a fresh interpreter, offline, and must exit
0. Shell blocks: each ``python -m blockws ...`` command is parsed by the command line's
own parser, so a documented option that does not exist fails here. Blocks of output
(``text``, ``::``) are not code. The Sphinx build itself (``-W``) runs in ``.ci/run``.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from blockws.__main__ import parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").rglob("*.rst"))
README = ROOT / "README.md"


def markdown_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start, i = i + 1, i + 1
            while lines[i].strip() != "```":
                i += 1
            blocks.append((start + 1, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return blocks


def rst_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.strip() != f".. code-block:: {language}":
            continue
        indent = len(line) - len(line.lstrip())
        body: list[str] = []
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or
                                  len(lines[j]) - len(lines[j].lstrip()) > indent):
            body.append(lines[j])
            j += 1
        text = "\n".join(body)
        strip = min(len(b) - len(b.lstrip()) for b in body if b.strip())
        blocks.append((i + 1, "\n".join(b[strip:] for b in body).strip("\n") + "\n"))
        assert text.strip(), f"{path}:{i + 1}: empty code block"
    return blocks


def all_blocks(language: str) -> list[tuple[str, str]]:
    found = [(f"README.md:{n}", code) for n, code in markdown_blocks(README, language)]
    for path in DOCS:
        rel = path.relative_to(ROOT)
        found += [(f"{rel}:{n}", code) for n, code in rst_blocks(path, language)]
    return found


PYTHON_BLOCKS = all_blocks("python")
SHELL_BLOCKS = all_blocks("sh")


def test_the_documentation_has_code_to_run() -> None:
    assert len(PYTHON_BLOCKS) >= 15
    assert any(where.startswith("README.md") for where, _ in PYTHON_BLOCKS)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where, code", PYTHON_BLOCKS, ids=[w for w, _ in PYTHON_BLOCKS])
def test_python_block_runs(where: str, code: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BLOCKWS_TRACE"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=80, cwd=ROOT, env=env)
    assert result.returncode == 0, f"{where}\n{code}\n{result.stderr[-3000:]}"


def cli_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for where, code in SHELL_BLOCKS:
        for line in code.splitlines():
            for part in line.split("|"):
                words = shlex.split(part.split("#")[0])
                if words[:3] == ["python", "-m", "blockws"]:
                    commands.append((where, words[3:]))
    return commands


@pytest.mark.unit
def test_documented_command_lines_parse() -> None:
    commands = cli_commands()
    assert len(commands) >= 5
    for where, args in commands:
        try:
            parser().parse_args(args)
        except SystemExit as exc:  # argparse's way of saying no
            pytest.fail(f"{where}: python -m blockws {' '.join(args)} -> exit {exc.code}")


@pytest.mark.unit
def test_readme_is_for_users() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    for word in ["seed", "mission", "this session", "../", "/work/", "/tmp/"]:
        assert word not in text.lower(), word
    # A newcomer finds how to trace frames, trust a private CA and read the subprotocol.
    assert "enable_trace" in text and "load_verify_locations" in text and "ws.protocol" in text
    assert "python -m sphinx -W -b html docs" in text
    assert text.count("```sh\n") >= 2 and "bash .ci/run" in text
    for heading in ["## Networks", "## Games", "## Limits and guarantees"]:
        assert heading in text


@pytest.mark.unit
def test_every_sample_says_what_it_shows_and_how_to_run_it() -> None:
    samples = sorted((ROOT / "samples").glob("*.py"))
    assert samples
    for sample in samples:
        source = sample.read_text(encoding="utf-8")
        match = re.match(r'\s*(?:#[^\n]*\n\s*)*"""(.+?)"""', source, re.S)
        assert match, f"{sample.name}: no module docstring"
        assert f"python samples/{sample.name}" in match.group(1), sample.name


@pytest.mark.unit
def test_license_changelog_contributing() -> None:
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["license"] == "MIT"
    assert "sphinx" in cfg["options.extras_require"]["docs"]
    md = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)
    rst_lines = (ROOT / "docs" / "changelog.rst").read_text(encoding="utf-8").splitlines()
    rst = [rst_lines[i - 1] for i, line in enumerate(rst_lines)
           if i and re.fullmatch(r"-{3,}", line)]
    assert md == rst and md
    contributing = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    assert "pytest -m unit" in contributing and "bash .ci/run" in contributing
    assert "apt-get" in contributing and "without root" in contributing.lower()
    assert "sphinx -W" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
