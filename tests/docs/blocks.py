"""The shell blocks of README.md and docs/*.md, and a shell that runs them as a reader would.

Blocks are read by pytest-codeblocks (``extract_from_file``): a fenced ``bash`` or ``sh`` block, the marks
written above it as HTML comments (``<!--pytest.mark.skip(reason="...")-->``), and its expected output, the
fenced block after ``<!--pytest-codeblocks:expected-output-->``. Expected output is compared as doctest
does with ELLIPSIS and NORMALIZE_WHITESPACE: ``...`` stands for anything, so a page shows the lines that
matter and elides run ids and timings.

Marks this tier understands, besides pytest's own:

- ``pytest.mark.exit_code(N)``: the block must end with status N (default 0).
- ``pytest.mark.foreground(ready="text", seconds=S, answers=URL)``: the block runs a server in the foreground;
  it passes once its output shows ``ready`` (and ``URL`` answers 200) within S seconds, then gets Ctrl-C, as a
  reader would press it.
- ``pytest.mark.screenshot(url="...", name="...")``: while a foreground block runs, headless Chromium
  takes a picture of ``url`` for the docs site (``docs/img/generated/NAME.png``).
- ``pytest.mark.under_load(url="...", versions=N)``: while the block runs, two keep-alive clients send
  single-row predictions to ``url`` (live traffic, which a canary needs to judge); the block passes only if
  none of them failed and their answers came from at least N model versions. The page says so in its text.
"""

from __future__ import annotations

import doctest
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pytest_codeblocks import extract_from_file

ROOT = Path(__file__).resolve().parents[2]
SHELL_SYNTAX = {"bash", "sh"}
CHECK = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass
class Block:
    page: str  # path relative to the repository root
    lineno: int
    code: str
    expected_output: str | None
    marks: list[Any] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.lineno}"

    def mark(self, name: str) -> Any | None:
        return next((m.mark for m in self.marks if m.mark.name == name), None)


def pages() -> list[Path]:
    """README.md first, then the docs site's pages in the order of mkdocs.yml's nav, then any other page."""
    ordered = [ROOT / "README.md"]
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text()).get("nav", []) if (ROOT / "mkdocs.yml").exists() else []

    def walk(items: Any) -> None:
        for item in items if isinstance(items, list) else [items]:
            if isinstance(item, dict):
                for value in item.values():
                    walk(value)
            elif isinstance(item, str) and item.endswith(".md"):
                ordered.append(ROOT / "docs" / item)

    walk(nav)
    for page in sorted((ROOT / "docs").rglob("*.md")):
        if page not in ordered:
            ordered.append(page)
    return [page for page in dict.fromkeys(ordered) if page.exists()]


def blocks(page: Path) -> list[Block]:
    found = []
    for block in extract_from_file(page):
        if block.syntax not in SHELL_SYNTAX:
            continue
        marks = [eval(mark, {"pytest": pytest, "sys": sys}) for mark in block.marks]  # noqa: S307 (our own pages)
        found.append(Block(str(page.relative_to(ROOT)), block.lineno, block.code, block.expected_output, marks))
    return found


def visible_text(page: Path) -> str:
    """The page as a reader sees it: without HTML comments."""
    return re.sub(r"<!--.*?-->", "", page.read_text(), flags=re.S)


def output_matches(expected: str, got: str) -> bool:
    return doctest.OutputChecker().check_output(expected, got, CHECK)


class Shell:
    """A login-less bash with nothing from the test process: ``env -i HOME=... PATH=/usr/bin:/bin``.

    Each block runs in a new bash, but what a reader's terminal would keep from one block to the next is
    carried over: exported variables (``source .venv/bin/activate``, ``export ...``) and the working
    directory. A block runs under ``set -e -o pipefail``: the first failing command ends it, as a reader would
    stop there.
    """

    def __init__(self, *, home: Path, state: Path, cwd: Path = ROOT) -> None:
        self.home, self.state, self.cwd_file = home, state / "env.sh", state / "cwd"
        state.mkdir(parents=True, exist_ok=True)
        self.cwd_file.write_text(str(cwd))
        self.state.write_text("")

    def _script(self, code: str) -> str:
        return (
            f'. "{self.state}"\n'
            f'cd "$(cat "{self.cwd_file}")"\n'
            f"trap 'rc=$?; export -p > \"{self.state}.new\" && mv \"{self.state}.new\" \"{self.state}\"; "
            f"pwd > \"{self.cwd_file}\"; exit $rc' EXIT\n"
            "set -e -o pipefail\n"
            f"{code}\n"
        )

    def _argv(self, code: str, *extra_env: str) -> list[str]:
        return ["env", "-i", f"HOME={self.home}", "PATH=/usr/bin:/bin", *extra_env, "bash", "-c", self._script(code)]

    @property
    def cwd(self) -> Path:
        return Path(self.cwd_file.read_text().strip())

    def run(self, code: str, *, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Runs ``code``; its stdout holds what it printed on both streams, in order, as a terminal shows it."""
        return subprocess.run(self._argv(code), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def run_foreground(self, code: str, *, ready: str, seconds: float,
                       while_ready: Any = None) -> tuple[bool, str]:
        """Start ``code``; once its output contains ``ready``, call ``while_ready()``, then Ctrl-C it.

        Returns whether ``ready`` was seen and everything it printed (stdout and stderr together).
        """
        log = self.state.parent / "foreground.log"
        with open(log, "w") as out:
            # A terminal shows a Python program's lines as they come; written to a file they would come in
            # blocks, and `ready` could sit in a buffer until the program ends.
            process = subprocess.Popen(self._argv(code, "PYTHONUNBUFFERED=1"), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            deadline, seen = time.monotonic() + seconds, False
            try:
                while time.monotonic() < deadline and process.poll() is None:
                    if ready in log.read_text(errors="replace"):
                        seen = True
                        break
                    time.sleep(0.5)
                if seen and while_ready is not None:
                    while_ready()
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, to the whole foreground job
                    try:
                        process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
        return seen, log.read_text(errors="replace")
