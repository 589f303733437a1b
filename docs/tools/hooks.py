"""MkDocs hook: the pictures under img/generated/ are made by the tests (tests/docs) and by
docs/tools/plot_bench.py, not checked in. A page that shows one that has not been made yet gets a placeholder
that says how to make it, and the build says so; with MLRAY_DOCS_REQUIRE_PICTURES=1 (CI, after the tests) a
missing picture is a warning, so `mkdocs build --strict` fails."""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.pictures")
PICTURE = re.compile(r"\((img/generated/[\w.-]+\.png)\)")


def _placeholder(name: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6, 1.2))
    fig.text(0.5, 0.5, f"{name}: not made yet.\nRun `make test-docs` (pictures of the runs) and `make docs`.",
             ha="center", va="center")
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def on_files(files: Files, config) -> Files:  # type: ignore[no-untyped-def]
    docs = Path(config["docs_dir"])
    wanted = {uri for page in docs.rglob("*.md") for uri in PICTURE.findall(page.read_text())}
    missing = sorted(uri for uri in wanted if files.get_file_from_path(uri) is None)
    for uri in missing:
        if os.environ.get("MLRAY_DOCS_REQUIRE_PICTURES") == "1":
            log.warning(f"{uri} has not been made: run tests/docs (make test-docs) before the docs build")
        else:
            log.info(f"{uri} has not been made yet: a placeholder stands in (make test-docs makes it)")
        files.append(File.generated(config, uri, content=_placeholder(Path(uri).name)))
    return files
