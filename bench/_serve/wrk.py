"""`wrk` as the load generator: POST bodies and a JSON summary from a Lua script, run at Ray's nice level.

A Python client on a 2-core machine takes the CPU the servers need; wrk (C, epoll, one thread) needs a
few percent of a core for thousands of requests a second. Every run is bounded in time (``-d``) and in
requests (the Lua ``request()`` stops a thread after ``max_requests``; a run that hits the cap is marked
``capped`` because wrk then still divides by the full duration).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench._serve.cpu import CpuMeter

# Ray starts its workers (Serve's replicas and proxy, HAProxy under it) at nice 15; the load generator
# runs at the same level so that it does not out-compete them for the two cores, and so do the baselines.
RAY_WORKER_NICE = 15

_SCRIPT = r"""
local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "1000000")
local body_file = os.getenv("BENCH_BODY_FILE")
local auth = os.getenv("BENCH_AUTHORIZATION")
local count_status = os.getenv("BENCH_COUNT_STATUS") == "1"
local sent = 0
local req
statuses = {}     -- globals: done() reads them from each thread with thread:get()
retry_after = 0
local threads = {}

function setup(thread) table.insert(threads, thread) end

function init(args)
  local f = assert(io.open(body_file, "rb"))
  local body = f:read("*a")
  f:close()
  local headers = {["Content-Type"] = "application/json"}
  if auth and auth ~= "" then headers["Authorization"] = auth end
  local extra = os.getenv("BENCH_EXTRA_HEADER")
  if extra and extra ~= "" then
    local name, value = extra:match("^([^:]+):%s*(.*)$")
    headers[name] = value
  end
  req = wrk.format("POST", nil, headers, body)
end

function request()
  sent = sent + 1
  if sent > max_requests then wrk.thread:stop() end
  return req
end

if count_status then
  function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
    if headers["Retry-After"] or headers["retry-after"] then retry_after = retry_after + 1 end
  end
end

function done(summary, latency, requests)
  local codes = {}
  local retry = 0
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then for code, n in pairs(s) do codes[#codes + 1] = string.format('"%d": %d', code, n) end end
    retry = retry + (t:get("retry_after") or 0)
  end
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"statuses": {%s}, "retry_after": %d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout, table.concat(codes, ", "), retry))
end
"""


@dataclass(frozen=True)
class LoadResult:
    """One wrk run. Rates count only 2xx answers; ``errors`` counts everything else."""

    connections: int
    rows_per_request: int
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    capped: bool
    statuses: dict[int, int]
    retry_after: int
    cpu_s: float | None = None  # CPU seconds of the server's processes during the run
    cpu_by_role: dict[str, float] = field(default_factory=dict)

    @property
    def ok_requests(self) -> int:
        return self.requests - self.errors

    @property
    def cpu_ms_per_request(self) -> float | None:
        return 1000 * self.cpu_s / self.requests if self.cpu_s is not None and self.requests else None

    @property
    def req_per_s(self) -> float:
        return self.ok_requests / self.seconds if self.seconds else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.req_per_s * self.rows_per_request

    def to_dict(self) -> dict:
        return {**self.__dict__, "req_per_s": self.req_per_s, "rows_per_s": self.rows_per_s,
                "cpu_ms_per_request": self.cpu_ms_per_request}

    @classmethod
    def from_dict(cls, raw: dict) -> LoadResult:
        fields = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        fields["statuses"] = {int(k): v for k, v in fields.get("statuses", {}).items()}
        return cls(**fields)


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is not installed: `apt-get install -y wrk` (Debian) - this benchmark needs it")
    return found


def _nice() -> None:
    os.setpriority(os.PRIO_PROCESS, 0, RAY_WORKER_NICE)


def run_wrk(url: str, body: bytes, *, connections: int, seconds: float, rows_per_request: int,
            max_requests: int = 200_000, authorization: str | None = None, count_status: bool = False,
            timeout_s: float = 5.0, cpu_of: list[int] | None = None) -> LoadResult:
    """POST ``body`` to ``url`` from ``connections`` keep-alive connections for ``seconds``.

    ``count_status`` adds a Lua ``response()`` callback (status codes, Retry-After headers); it makes
    wrk parse every response, so it is for correctness probes, not for throughput runs. ``cpu_of``: pids
    whose process trees are the server; their CPU seconds during the run are recorded.
    """
    with tempfile.TemporaryDirectory(prefix="mlray-wrk-") as tmp:
        script, body_file = Path(tmp, "post.lua"), Path(tmp, "body.json")
        script.write_text(_SCRIPT)
        body_file.write_bytes(body)
        env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_MAX_REQUESTS": str(max_requests),
               "BENCH_AUTHORIZATION": authorization or "", "BENCH_COUNT_STATUS": "1" if count_status else "0"}
        # One wrk thread: it drives thousands of requests a second from a few percent of one core.
        cmd = [wrk_binary(), "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
               f"--timeout={max(1, round(timeout_s))}s", "-s", str(script), url]
        with CpuMeter(cpu_of or []) as meter:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=_nice,
                                  timeout=seconds + timeout_s + 30)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1000:]}{done.stderr[-1000:]}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    errors = raw["status"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return LoadResult(
        connections=connections, rows_per_request=rows_per_request, requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6, p50_ms=raw["p50_us"] / 1e3, p90_ms=raw["p90_us"] / 1e3,
        p99_ms=raw["p99_us"] / 1e3, max_ms=raw["max_us"] / 1e3, errors=errors,
        capped=raw["requests"] >= max_requests, statuses={int(k): v for k, v in raw["statuses"].items()},
        retry_after=raw["retry_after"], cpu_s=meter.total if cpu_of else None,
        cpu_by_role=meter.by_role() if cpu_of else {},
    )
