"""What can be checked of the pages without a cluster: skipped blocks say why where the reader sees it, and
every flag of the CLI table exists (a renamed flag fails here, and in the block that uses it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.blocks import ROOT, blocks, pages, visible_text
from tests.docs.test_docs import cli_table_commands

BIN = Path(sys.executable).parent
MARKER = "Not run by the docs tests:"  # what a page says, in its text, about a block it marks skip


def test_there_are_blocks_to_run() -> None:
    found = [block for page in pages() for block in blocks(page)]
    assert any(block.page == "README.md" for block in found)
    assert any(block.code.strip() == "make quickstart" for block in found)


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_skipped_block_says_why_on_the_page(page: Path) -> None:
    text = " ".join(visible_text(page).split())
    for block in blocks(page):
        skip = block.mark("skip")
        if skip is None:
            continue
        reason = skip.kwargs.get("reason", "")
        assert reason, f"{block.id}: a skip mark needs a reason"
        shown = " ".join(f"{MARKER} {reason}".split())
        assert shown in text, f"{block.id}: the page does not say, where readers see it: {shown!r}"


def test_every_flag_of_the_cli_table_exists() -> None:
    rows = [line for page in pages() for line in page.read_text().splitlines() if line.startswith("| `mlray ")]
    for row, command in zip(rows, cli_table_commands(), strict=True):
        usage = row.split("|")[1]
        flags = set(re.findall(r"(--[a-z][a-z-]*|-[a-z]\b)", usage))
        helped = subprocess.run([str(BIN / "mlray"), *command.split(), "--help"], capture_output=True, text=True,
                                env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "TERM": "dumb"})
        assert helped.returncode == 0, helped.stderr
        missing = {flag for flag in flags if not re.search(rf"(^|[\s,]){re.escape(flag)}\b", helped.stdout, re.M)}
        assert not missing, f"`mlray {command}` has no {sorted(missing)} (CLI table row: {row.strip()})"
