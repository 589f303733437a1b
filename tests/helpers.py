"""Shared test helpers: condition waits (never bare sleeps), free ports, process checks, steady load."""

from __future__ import annotations

import http.client
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], *, timeout: float, interval: float = 0.25, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 - keep polling; report the last error on timeout
            last = err
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout} s" + (f" (last error: {last})" if last else ""))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ray_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "raylet|gcs_server|ray::"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


class SteadyLoad:
    """Single-row requests in background threads until stopped, bounded in count and time; loopback only.

    Each thread is the plain client the serving issue names: one keep-alive HTTP/1.1 connection
    (``http.client``) and no transport retries. A request that fails on the wire (reset, closed without an
    answer) is recorded as a failure ``(-1, exception name, "")``, and the next request opens a new
    connection, as such a client would; a ``Connection: close`` answer is not a failure (``http.client``
    reconnects for the next request). Unlike ``requests``/urllib3, nothing checks a pooled connection before
    reusing it, so a server closing idle keep-alive connections shows up here.

    Records (status, x-model-version, x-model-role) of every final answer, (status, body, "") of errors.
    ``retry_on_503`` makes it a client that retries a 503 (after ``Retry-After``, capped) before giving up;
    ``retry_on_500`` one that retries a server error at once (a canary's failures).
    """

    def __init__(self, url: str, *, row: list[float], threads: int = 2, max_requests: int = 20_000,
                 max_seconds: float = 180.0, headers: dict[str, str] | None = None, retry_on_503: bool = False,
                 pause_s: float = 0.0, retry_on_500: bool = False) -> None:
        import json
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"SteadyLoad sends to loopback only, not {parts.hostname!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.body = json.dumps({"instances": [row]}).encode()
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.retry_on_503, self.retry_on_500 = retry_on_503, retry_on_500
        self.max_requests, self.deadline, self.pause_s = max_requests, time.monotonic() + max_seconds, pause_s
        self.results: list[tuple[int, str, str]] = []
        self._thread_of: list[int] = []  # which client thread got each result
        self.retries = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _one(self, conn: http.client.HTTPConnection) -> tuple[int, str, str]:
        for attempt in range(20):
            try:
                conn.request("POST", self.path, body=self.body, headers=self.headers)
                response = conn.getresponse()
                text = response.read()
            except (OSError, http.client.HTTPException) as err:
                conn.close()  # the next request opens a new connection; this one is lost
                return (-1, type(err).__name__, "")
            if response.status == 503 and self.retry_on_503 and attempt < 19:
                with self._lock:
                    self.retries += 1
                time.sleep(min(float(response.headers.get("retry-after", "1") or 1), 0.5))
                continue
            if response.status == 500 and self.retry_on_500 and attempt < 19:
                with self._lock:
                    self.retries += 1
                continue
            if response.status != 200:
                return (response.status, text[:300].decode(errors="replace"), "")
            return (response.status, response.headers.get("x-model-version", ""),
                    response.headers.get("x-model-role", ""))
        raise AssertionError("unreachable")

    def _run(self) -> None:
        # A closed connection (after a failure, or an answer with `Connection: close`) opens a new socket on
        # its next request: http.client's own behaviour.
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                with self._lock:
                    if len(self.results) >= self.max_requests:
                        return
                result = self._one(conn)
                with self._lock:
                    self.results.append(result)
                    self._thread_of.append(threading.get_ident())
                if self.pause_s:
                    time.sleep(self.pause_s)
        finally:
            conn.close()

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def running(self) -> bool:
        """Whether any client thread still sends (each stops at ``max_requests`` or ``max_seconds``)."""
        return any(thread.is_alive() for thread in self._threads)

    def failures(self) -> list[tuple[int, str, str]]:
        with self._lock:
            return [r for r in self.results if r[0] != 200]

    def versions_by_thread(self) -> list[list[str]]:
        """Each client thread's answering versions in the order it got them, consecutive repeats collapsed.
        (Across threads the order of results is the order they were appended, not answered.)"""
        with self._lock:
            pairs = list(zip(self._thread_of, self.results, strict=True))
        out = []
        for thread in dict.fromkeys(t for t, _ in pairs):
            seen = [r[1] for t, r in pairs if t == thread and r[0] == 200]
            out.append([v for i, v in enumerate(seen) if i == 0 or seen[i - 1] != v])
        return out

    def versions(self) -> list[str]:
        """The versions that answered, in order, with consecutive repeats collapsed."""
        with self._lock:
            seen = [r[1] for r in self.results if r[0] == 200]
        return [v for i, v in enumerate(seen) if i == 0 or seen[i - 1] != v]


def need_program(name: str, install: str) -> None:
    """Skip the calling test module when a program is missing, or fail under MLRAY_REQUIRE_LAB=1 (as in CI,
    whose .ci/run installs it): a missing program must not pass CI as a skip."""
    import os
    import shutil

    import pytest

    if shutil.which(name) is not None:
        return
    if os.environ.get("MLRAY_REQUIRE_LAB") == "1":
        pytest.fail(f"{name} is not installed ({install})", pytrace=False)
    pytest.skip(f"{name} is not installed ({install})", allow_module_level=True)


# A Ray driver (this test process, once a session fixture connected it) prints its workers' log lines on its
# own stderr, e.g. "\x1b[36m(PlacementGroupCleaner pid=15640)\x1b[0m Failed to query ...", at any moment.
RAY_FORWARDED_LOG = re.compile(r"^(\x1b\[[0-9;]*m)*\((\w|[:.-])+ pid=\d+")


def printed_lines(text: str) -> list[str]:
    """The non-blank lines of captured output, without the Ray worker log lines a connected driver forwards."""
    return [line for line in text.splitlines() if line.strip() and not RAY_FORWARDED_LOG.match(line)]
