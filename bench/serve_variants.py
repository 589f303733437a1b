"""Compressed variants behind the same Serve app: the parent, its dynamic-int8 and its ONNX variant.

In a temporary MLRAY_HOME (or ``--home``): a digits model trained here (``bench/serve.py``'s
``prepare_model``) at ``@champion``, then ``mlray.compress`` makes its ``dynamic-int8`` and ``onnx`` variants,
given the aliases ``champion-int8`` and ``champion-onnx``. One local Ray cluster with mlray's Serve settings;
the same app (its replicas as the shipped YAML's autoscaling starts them) is deployed for each alias in turn,
measured alone, in rounds that alternate parent / int8 / ONNX so that all three see the same machine:

- single rows: ``--clients`` Python threads at nice 15 (as Ray's workers), V1 requests of one row; req/s, p99,
  and the replicas' CPU milliseconds per request (their processes' user + system CPU time over the run,
  from psutil, divided by the requests answered);
- 256 rows: 2 clients, V1 requests of 256 rows; rows/s and the replica's CPU milliseconds per 256 rows.

Every answer is checked: the header ``x-model-variant`` names the variant that should be serving.

    python bench/serve_variants.py                 # ~5 min
    python bench/serve_variants.py --rounds 3 --seconds 15
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import requests

REPO = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO))

from bench._serve.serve_trial import _start_ray, free_port, isolation_env  # noqa: E402
from bench.serve import MODEL, prepare_model, serve_settings  # noqa: E402

VARIANTS = {"parent": ("champion", "none"), "dynamic-int8": ("champion-int8", "dynamic-int8"),
            "onnx": ("champion-onnx", "onnx")}


def make_variants(version: int) -> dict[str, dict[str, float]]:
    """Compress the parent into each variant (if this home has none yet) and point its alias at it."""
    from mlray.compress import compress
    from mlray.errors import NotFound
    from mlray.registry import get_version
    from mlray.registry.tracking import client

    figures = {}
    for name, (alias, method) in VARIANTS.items():
        if method == "none":
            continue
        try:
            found = get_version(MODEL, alias=alias)
            figures[name] = {k.removeprefix("mlray.compress."): float(v) for k, v in found.tags.items()
                             if k.startswith("mlray.compress.") and _is_number(v)}
            continue
        except NotFound:
            pass
        result = compress(MODEL, version=version, method=method)
        client().set_registered_model_alias(MODEL, alias, str(result.version))
        figures[name] = dict(result.figures)
    return figures


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def deploy(alias: str, *, port: int) -> str:
    from mlray.serving.deploy import ServePlan
    from mlray.serving.deploy import deploy as run

    plan = ServePlan(app_name="variants", route_prefix="/variants", host="127.0.0.1", port=port,
                     args={"model": MODEL, "alias": alias, "metrics_agent_nice": 19},
                     deployment_options={"num_replicas": 1})
    return run(plan, timeout_s=300)


def replica_processes(settle_s: float = 3.0) -> list[psutil.Process]:
    """The app's Serve replicas (Ray workers whose title names the app); the previous deploy's replicas may
    take a few seconds to exit after ``serve.delete``, so the set is read once it stops changing."""
    def current() -> set[int]:
        return {p.pid for p in psutil.process_iter(["cmdline", "status"])
                if p.info["status"] != psutil.STATUS_ZOMBIE
                and (p.info["cmdline"] or [""])[0].startswith("ray::ServeReplica:variants")}

    seen, deadline = current(), time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(settle_s)
        now = current()
        if now == seen and now:
            break
        seen = now
    return [psutil.Process(pid) for pid in sorted(seen)]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def load(url: str, body: dict[str, Any], variant: str, *, clients: int, seconds: float, rows: int
         ) -> dict[str, Any]:
    """``clients`` threads sending ``body`` for ``seconds``; req/s, rows/s, p99 and the replica's CPU."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    replicas = replica_processes()
    cpu_before = cpu_seconds(replicas)
    deadline = time.monotonic() + seconds

    def client() -> None:
        os.nice(15)  # per thread on Linux: the clients compete as Ray's workers do
        mine, bad = [], []
        with requests.Session() as session:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                r = session.post(f"{url}/v1/models/{MODEL}:predict", json=body, timeout=60)
                mine.append(time.perf_counter() - started)
                if r.status_code != 200:
                    bad.append(f"{r.status_code} {r.text[:100]}")
                elif r.headers.get("x-model-variant") != variant:
                    bad.append(f"answered by variant {r.headers.get('x-model-variant')!r}, not {variant!r}")
        with lock:
            latencies.extend(mine)
            failures.extend(bad)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    cpu_s = cpu_seconds(replicas) - cpu_before
    ordered = sorted(latencies)
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, first: {failures[0]}")
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "rows_s": rows * len(latencies) / elapsed,
            "p99_ms": 1e3 * ordered[int(len(ordered) * 0.99) - 1], "cpu_ms": 1e3 * cpu_s / len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="reuse (or create) this MLRAY_HOME")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="mlray-bench-variants-"))
    os.environ["MLRAY_HOME"] = str(home)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    model = prepare_model(epochs=5)
    figures = make_variants(model["version"])
    env, _ = serve_settings()
    os.environ.update({**env, **isolation_env(Path(tempfile.mkdtemp(prefix="mlrb-", dir="/tmp")))})
    _start_ray()
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    single = {"instances": model["rows"][:1]}
    batch = {"instances": model["rows"][:256]}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {name: {"single": [], "batch": []} for name in VARIANTS}
    try:
        for _ in range(args.rounds):
            for name, (alias, variant) in VARIANTS.items():
                url = deploy(alias, port=port)
                load(url, single, variant, clients=args.clients, seconds=2, rows=1)  # warm-up, not counted
                results[name]["single"].append(load(url, single, variant, clients=args.clients,
                                                    seconds=args.seconds, rows=1))
                results[name]["batch"].append(load(url, batch, variant, clients=2, seconds=args.seconds, rows=256))
                serve.delete("variants")
                print(name, results[name]["single"][-1], results[name]["batch"][-1], flush=True)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    print(report(results, figures, args))


def report(results: dict[str, dict[str, list[dict[str, Any]]]], figures: dict[str, dict[str, float]],
           args: argparse.Namespace) -> str:
    def med(name: str, kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name][kind])

    base_cpu, base_rows = med("parent", "single", "cpu_ms"), med("parent", "batch", "rows_s")
    lines = [f"Served variants, {dt.date.today()}: the app's replicas, single rows from {args.clients} clients "
             f"(nice 15) and 256-row requests from 2 clients, {args.rounds} rounds of {args.seconds:.0f} s, medians",
             "", "| variant | single-row req/s | p99 ms | CPU ms / request | vs parent | 256-row rows/s | "
             "CPU ms / 256 rows | rows/s vs parent |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in results:
        cpu, rows = med(name, "single", "cpu_ms"), med(name, "batch", "rows_s")
        lines.append(f"| {name} | {med(name, 'single', 'rps'):.0f} | {med(name, 'single', 'p99_ms'):.1f} | "
                     f"{cpu:.2f} | {cpu / base_cpu:.2f}x | {rows:,.0f} | {med(name, 'batch', 'cpu_ms'):.1f} | "
                     f"{rows / base_rows:.2f}x |")
    lines += ["", "Offline figures of the variants (mlray.compress, this run): " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(values.items())) for name, values in figures.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
