"""Many models per app: one app of 8 or 20 models against the single-model app, same run, same cluster.

In a temporary MLRAY_HOME (or ``--home``): a digits model trained here (``bench/serve.py``'s
``prepare_model``), registered again as ``tiny-00`` .. ``tiny-19`` (the same files, 20 registered models), a
scikit-learn classifier and a plain python_function (``tests/foreign_models.py``). One local Ray cluster with
mlray's Serve settings; each app gets 2 replicas and is measured alone:

- ``single``: ``model: digits`` (the baseline);
- ``8 models``: ``models:`` tiny-00..07, round-robin; every replica pre-warms all 8 (all loaded);
- ``12 models``: tiny-00..11 with ``max_models_per_replica: 8``: more than a replica keeps, fewer than the two
  keep together. With model affinity (the default) each replica claims up to 7 and HAProxy sends a claimed
  model's requests to its replica; ``no affinity`` (``model_affinity: false``) is HAProxy's balancing alone, the
  baseline of the same run;
- ``20 models``: tiny-00..19 with ``max_models_per_replica: 8``, round-robin: more than both replicas keep, so
  loads and evictions stay on the path; with and without affinity.

Clients: ``--clients`` Python threads at nice 15 (as Ray's workers), single-row V1 requests, each run
``--seconds`` long, rounds alternating single / 8 / 20 so that all see the same machine. Cold loads: an app of
three flavours with ``max_models_per_replica: 1``, where each first request loads its model (download, hash
check, load, warm-up) after evicting the previous one.

    python bench/serve_many.py                 # ~8 min
    python bench/serve_many.py --rounds 3 --seconds 15
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

import requests

REPO = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO))

from bench._serve.serve_trial import _start_ray, free_port, isolation_env  # noqa: E402
from bench.serve import prepare_model, serve_settings  # noqa: E402

NAMES = [f"tiny-{i:02d}" for i in range(20)]


def register_models() -> None:
    from mlray.registry import get_version, register
    from mlray.registry.tracking import client
    from tests.foreign_models import register_classifier, register_regressor

    source = get_version("digits", alias="champion")
    for name in NAMES:
        version = register(name, model_uri=source.source, run_id=source.run_id, tags=dict(source.tags)).version
        client().set_registered_model_alias(name, "champion", str(version))
    for name, make in (("iris", register_classifier), ("halfsum", register_regressor)):
        client().set_registered_model_alias(name, "champion", str(make(name)))


def deploy(app: str, args: dict[str, Any], *, port: int, replicas: int) -> str:
    from mlray.serving.deploy import ServePlan
    from mlray.serving.deploy import deploy as run

    plan = ServePlan(app_name=app, route_prefix=f"/{app}", host="127.0.0.1", port=port,
                     args={"metrics_agent_nice": 19, **args}, deployment_options={"num_replicas": replicas})
    return run(plan, timeout_s=300)


def load(url: str, names: list[str], row: list[float], *, clients: int, seconds: float) -> dict[str, Any]:
    """Round-robin over ``names`` from ``clients`` threads; req/s, p50/p99 (ms), failures, and the p99 of the
    requests whose model was loaded already (answers without ``server-timing: load;dur=...``)."""
    latencies: list[float] = []
    loaded: list[float] = []  # the requests that did not wait for their model's load
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        os.nice(15)  # per thread on Linux: the clients compete as Ray's workers do
        mine, hits, bad, i = [], [], [], k
        with requests.Session() as session:
            while time.monotonic() < deadline:
                name = names[i % len(names)]
                i += 1
                started = time.perf_counter()
                r = session.post(f"{url}/v1/models/{name}:predict", json={"instances": [row]},
                                 headers={"serve_multiplexed_model_id": name}, timeout=60)
                mine.append(time.perf_counter() - started)
                if r.status_code != 200:
                    bad.append(f"{r.status_code} {r.text[:100]}")
                elif "load;" not in r.headers.get("server-timing", ""):
                    hits.append(mine[-1])
        with lock:
            latencies.extend(mine)
            loaded.extend(hits)
            failures.extend(bad)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    ordered, hits = sorted(latencies), sorted(loaded)
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "failures": len(failures),
            "p50_ms": 1e3 * ordered[len(ordered) // 2], "p99_ms": 1e3 * ordered[int(len(ordered) * 0.99) - 1],
            "loaded_share": len(hits) / max(1, len(latencies)),
            "p99_loaded_ms": 1e3 * hits[max(0, int(len(hits) * 0.99) - 1)] if hits else float("nan"),
            "first_failure": failures[0] if failures else ""}


def cold_loads(port: int) -> list[tuple[str, str, float, float]]:
    """(model, flavour, first request's ms, load_seconds the replica reports) per flavour."""
    from ray import serve

    url = deploy("flavours", {"models": [{"name": "iris"}, {"name": "digits"}, {"name": "halfsum"}],
                              "max_models_per_replica": 1, "allow_pickle": True}, port=port, replicas=1)
    rows = {"iris": [5.1, 3.5, 1.4, 0.2], "halfsum": [5.1, 3.5, 1.4, 0.2], "digits": [0.0] * 64}
    out = []
    for name, flavour in (("digits", "mlray (safetensors)"), ("halfsum", "python_function (cloudpickle)"),
                          ("iris", "sklearn (skops)")):
        started = time.perf_counter()
        r = requests.post(f"{url}/v1/models/{name}:predict", json={"instances": [rows[name]]}, timeout=120)
        first = 1e3 * (time.perf_counter() - started)
        assert r.status_code == 200, r.text
        meta = requests.get(f"{url}/v1/models/{name}", timeout=60).json()
        out.append((name, flavour, first, float(meta.get("load_seconds", float("nan")))))
    serve.delete("flavours")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="reuse (or create) this MLRAY_HOME")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="mlray-bench-many-"))
    os.environ["MLRAY_HOME"] = str(home)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    model = prepare_model(epochs=2)
    register_models()
    env, _ = serve_settings()
    os.environ.update({**env, **isolation_env(Path(tempfile.mkdtemp(prefix="mlrb-", dir="/tmp")))})
    _start_ray()
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    row = model["rows"][0]
    apps = {"single": ({"model": "digits"}, ["digits"]),
            "8 models": ({"models": [{"name": n} for n in NAMES[:8]]}, NAMES[:8]),
            "12 models, no affinity": ({"models": [{"name": n} for n in NAMES[:12]], "max_models_per_replica": 8,
                                        "model_affinity": False}, NAMES[:12]),
            "12 models": ({"models": [{"name": n} for n in NAMES[:12]], "max_models_per_replica": 8}, NAMES[:12]),
            "20 models, no affinity": ({"models": [{"name": n} for n in NAMES], "max_models_per_replica": 8,
                                        "model_affinity": False}, NAMES),
            "20 models": ({"models": [{"name": n} for n in NAMES], "max_models_per_replica": 8}, NAMES)}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in apps}
    try:
        for _ in range(args.rounds):
            for name, (app_args, names) in apps.items():
                url = deploy("many", app_args, port=port, replicas=2)
                load(url, names, row, clients=args.clients, seconds=2)  # warm-up, not counted
                results[name].append(load(url, names, row, clients=args.clients, seconds=args.seconds))
                serve.delete("many")
                print(name, results[name][-1], flush=True)
        flavours = cold_loads(port)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    print(report(results, flavours, args))


def report(results: dict[str, list[dict[str, Any]]], flavours: list[tuple[str, str, float, float]],
           args: argparse.Namespace) -> str:
    base = statistics.median(r["p99_ms"] for r in results["single"])
    lines = [f"Many models per app, {dt.date.today()}: 2 replicas per app, {args.clients} clients (nice 15), "
             f"single-row V1, {args.rounds} rounds of {args.seconds:.0f} s, medians over rounds. \"loaded\": the "
             "requests whose model their replica held already (no `server-timing: load`)",
             "", "| app | req/s | p50 ms | p99 ms | p99 / single | loaded share | p99 loaded ms | loaded p99 / single "
             "| failed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in results.items():
        p99 = statistics.median(r["p99_ms"] for r in runs)
        p99_loaded = statistics.median(r["p99_loaded_ms"] for r in runs)
        lines.append(f"| {name} | {statistics.median(r['rps'] for r in runs):.0f} | "
                     f"{statistics.median(r['p50_ms'] for r in runs):.1f} | {p99:.1f} | {p99 / base:.2f}x | "
                     f"{statistics.median(r['loaded_share'] for r in runs):.0%} | {p99_loaded:.1f} | "
                     f"{p99_loaded / base:.2f}x | {sum(r['failures'] for r in runs)} |")
    lines += ["", "| cold load | flavour | first request ms | load + warm-up s (replica) |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {flavour} | {first:.0f} | {seconds:.2f} |" for name, flavour, first, seconds in flavours]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
