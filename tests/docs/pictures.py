"""Pictures for the docs site, made by the docs tier: nothing under docs/img/generated is drawn by hand.

- ``learning_curve.png`` and ``confusion_matrix.png``: the quickstart run's own report, as mlray logs it to
  MLflow with every training (copied from the run's artifacts);
- ``ray-dashboard.png`` and ``mlflow-ui.png``: headless Chromium (Debian's ``chromium``) on the running
  dashboard and on the MLflow UI that the README's ``mlflow ui`` line starts.

The bench plots come from ``docs/plot_bench.py`` (results already in bench/results, no cluster needed).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from tests.docs.blocks import ROOT
from tests.helpers import wait_for

GENERATED = ROOT / "docs" / "img" / "generated"
REPORT = ("learning_curve.png", "confusion_matrix.png")


def copy_run_report(artifacts: Path, into: Path) -> list[Path]:
    """The report pictures of the first run under ``artifacts`` (the quickstart's), copied to ``into``."""
    copied = []
    for name in REPORT:
        found = sorted(artifacts.rglob(f"report/{name}"), key=lambda p: p.stat().st_mtime)
        assert found, f"no report/{name} among the quickstart run's artifacts under {artifacts}"
        copied.append(Path(shutil.copyfile(found[0], into / name)))
    return copied


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code < 500
    except requests.RequestException:
        return False


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise AssertionError("headless Chromium is needed for the docs screenshots: apt-get install chromium "
                         "(.ci/run installs it)")


def screenshot(url: str, into: Path, *, wait_ms: int = 5000, size: str = "1280,800", attempts: int = 3,
               attempt_s: float = 75.0) -> Path:
    """A PNG of ``url`` as headless Chromium renders it after ``wait_ms`` of (virtual) page time, once the
    server answers (a server that says it is listening may still be starting its workers).

    Chromium can hang on a loaded machine: in CI (stop 28) one run on the MLflow UI had not finished after
    120 s where it usually takes seconds. Each attempt runs in its own process group with its own profile and
    is killed whole (renderers and all) after ``attempt_s``; the next starts afresh."""
    wait_for(lambda: _answers(url), timeout=180, what=f"{url} answering")
    into.unlink(missing_ok=True)
    failures = []
    for attempt in range(1, attempts + 1):
        with tempfile.TemporaryDirectory(prefix="mlray-chromium-") as profile:
            browser = subprocess.Popen(
                [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={profile}",
                 f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={into}", url],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
            try:
                _, stderr = browser.communicate(timeout=attempt_s)
            except subprocess.TimeoutExpired:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.communicate()  # reaped
                failures.append(f"attempt {attempt}: no picture after {attempt_s:g} s, killed")
                continue
        if into.exists() and into.stat().st_size > 10_000:
            return into
        failures.append(f"attempt {attempt}: chromium exit {browser.returncode}: {stderr[-1500:]}")
    raise AssertionError(f"no screenshot of {url} in {attempts} attempts:\n" + "\n".join(failures))


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length", "host"}


@contextmanager
def with_headers(target: str, headers: dict[str, str]) -> Iterator[str]:
    """A loopback HTTP proxy to ``target`` that adds ``headers`` to every request; yields its URL.

    Headless Chromium has no flag for a request header or a cookie, and the dashboard of a head with token
    auth answers 401 to every API call without one (a person types the token once; a cookie keeps it).
    """

    class Forward(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            sent = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            answer = requests.request(self.command, f"{target}{self.path}", data=body, timeout=60,
                                      headers={**sent, **headers}, allow_redirects=False)
            self.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_HEAD = do_POST = _forward

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
