"""Serving speed: mlray's Ray Serve app against a plain FastAPI process and `mlflow models serve`, same run.

All three serve the same registered digits model (trained here for a few epochs with `mlray.training.train` in a
temporary MLRAY_HOME, promoted to @champion) on loopback:

- mlray: serve_apps/digits.yaml deployed with `mlray.serving.deploy.load_plan` + `deploy` (the CLI's path),
  reading the model from the MLflow registry, in its own local Ray cluster started with the Serve settings
  under test (a fixed replica count instead of the YAML's autoscaling, so runs compare);
- plain: one FastAPI + uvicorn process with an async handler (bench/_serve/plain_app.py), measured right
  after each of mlray's runs so that both see the same share of a busy machine;
- mlflow: `mlflow models serve -m models:/NAME/VERSION --env-manager local` (MLflow's `dataframe_split` body).

wrk (Debian's `wrk`, one thread, keep-alive) sends single-row requests from 1, 16 and 64 connections and
256-row requests from 16; every run is bounded in time and requests. Ray runs its workers at nice 15, so the
baselines and wrk run at nice 15 too. Besides req/s and latency, each run records the CPU seconds the
server's processes spent per request. mlray's cluster is also checked: its listening sockets, backpressure,
every replica replaced under load, `serve.shutdown()` time. Prints markdown (also written to bench/results/)
with the issue's targets checked.

    python bench/serve.py                    # ~5-6 min: the three servers, 7 rounds of single rows at 16 clients
    python bench/serve.py --quick            # ~3 min: 3-s runs, 5 rounds at 16 clients, no rollover check
    python bench/serve.py --repeat 10        # more rounds at 16 clients (p99 moves 2x between rounds here)
    python bench/serve.py --sweep            # + Serve settings compared (proxy modes, batching, replicas), +20 min
    python bench/serve.py --sweep --modes ha+to ha+to+nohapm --skip mlflow mlray   # a subset
    python bench/serve.py --home DIR         # reuse (or create) a home with a trained digits model
    python bench/serve.py --api-key KEY      # send `Authorization: Bearer KEY` and switch the app's auth on
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO))

from bench._serve import report  # noqa: E402
from bench._serve.serve_trial import MODES, free_port  # noqa: E402
from bench._serve.wrk import RAY_WORKER_NICE, LoadResult, run_wrk, wrk_binary  # noqa: E402

MODEL = "digits"
# (connections, rows per request) for the main table; the targets are read at 16 connections.
LOADS = [(1, 1), (16, 1), (64, 1), (16, 256)]

# What mlray should run a serving head with, found by `--sweep` on this machine (bench/README.md, "Serve
# settings"): HAProxy in front, the throughput-optimized replica path, no HAProxy request metrics, a short
# drain for direct-ingress replicas; the HAProxy binds locked to loopback by a wrapper (serve_trial.py).
from mlray.cluster.serve_env import FAST_SERVE_ENV as RECOMMENDED_ENV  # noqa: E402 - what mlray sets on its heads

B1 = {"name": "batch, 1 replica", "batching": True, "replicas": 1}
N1 = {"name": "no batch, 1 replica", "batching": False, "replicas": 1}
N2 = {"name": "no batch, 2 replicas", "batching": False, "replicas": 2}
B2 = {"name": "batch, 2 replicas", "batching": True, "replicas": 2}
N1Q = {"name": "no batch, 1 replica, no access log", "batching": False, "replicas": 1, "access_log": False}
# Every mode with batching on and off; replicas and the access log only where the proxy is not the bottleneck.
SWEEP_VARIANTS = {"default": [B1, N1], "ha": [B1, N1], "to": [B1, N1], "ha+to": [B1, N1],
                  "ha+to+nohapm": [B1, N1, N1Q, N2, B2]}


# -- the model -------------------------------------------------------------------------------------------------


def prepare_model(*, epochs: int) -> dict[str, Any]:
    """A digits version at @champion in this MLRAY_HOME: trained here unless one is there already."""
    from mlray.config import parse_config
    from mlray.errors import NotFound
    from mlray.registry import get_version, promote
    from mlray.serving.loader import load_registered
    from mlray.training.data import sample_test_rows

    cfg = parse_config({"name": MODEL, "train": {"num_workers": 1, "epochs": epochs}})
    try:
        version = get_version(MODEL, alias="champion").version
        print(f"Using {MODEL} version {version} (@champion) already in {os.environ['MLRAY_HOME']}")
    except NotFound:
        import ray

        from mlray.training.train import train

        started = time.monotonic()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # a new cluster, ours
        try:
            version = train(cfg).version
        finally:
            ray.shutdown()
        promote(MODEL, version=version, alias="champion", gate=cfg.registry.gate, reason="bench/serve.py")
        print(f"Trained and registered {MODEL} version {version} in {time.monotonic() - started:.0f} s")
    loaded = load_registered(MODEL, version=version).loaded
    x, _ = sample_test_rows(cfg.data, seed=cfg.seed, count=256)
    rows = [[float(v) for v in row] for row in x]
    return {"version": version, "feature_names": loaded.feature_names, "rows": rows}


def bodies(model: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Request bodies by protocol and rows per request: V1 `instances`, MLflow's `dataframe_split`."""
    out: dict[str, dict[str, str]] = {"v1": {}, "mlflow": {}}
    for n in sorted({rows for _, rows in LOADS}):
        rows = (model["rows"] * (n // len(model["rows"]) + 1))[:n]
        out["v1"][str(n)] = json.dumps({"instances": rows})
        out["mlflow"][str(n)] = json.dumps({"dataframe_split": {"columns": model["feature_names"], "data": rows}})
    return out


# -- the baselines: plain processes ----------------------------------------------------------------------------


def _nice() -> None:
    os.setpriority(os.PRIO_PROCESS, 0, RAY_WORKER_NICE)


def start_process(cmd: list[str], *, env: dict[str, str], ready_url: str, log: Path,
                  timeout_s: float = 120) -> subprocess.Popen:
    # Its own session, so that stopping it ends its children too (mlflow runs uvicorn under it).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            preexec_fn=_nice, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if requests.get(ready_url, timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.3)
    stop_process(proc)
    raise RuntimeError(f"{cmd[:3]} did not answer {ready_url} within {timeout_s:.0f} s:\n{log.read_text()[-2000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)  # the group of the process this benchmark started, nothing else
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def measure(url: str, protocol_bodies: dict[str, str], *, seconds: float, warmup_s: float,
            authorization: str | None, pid: int) -> list[LoadResult]:
    run_wrk(url, protocol_bodies["1"].encode(), connections=16, seconds=warmup_s, rows_per_request=1,
            authorization=authorization)
    return [run_wrk(url, protocol_bodies[str(rows)].encode(), connections=conns, seconds=seconds,
                    rows_per_request=rows, authorization=authorization, cpu_of=[pid]) for conns, rows in LOADS]


@contextmanager
def plain_server(model: dict[str, Any], body: dict[str, str], *, logs: Path,
                 authorization: str | None) -> Iterator[dict[str, Any]]:
    """The plain process, warm, for as long as the block runs; yields its predict URL and pid."""
    port = free_port()
    env = {**os.environ, "BENCH_MODEL": MODEL, "BENCH_VERSION": str(model["version"]),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "bench._serve.plain_app:create_app", "--host", "127.0.0.1",
           "--port", str(port), "--no-access-log", "--log-level", "warning"]
    proc = start_process(cmd, env=env, ready_url=f"http://127.0.0.1:{port}/healthz", log=logs / "plain.log")
    try:
        url = f"http://127.0.0.1:{port}/v1/models/{MODEL}:predict"
        _check(url, body["1"], authorization)
        run_wrk(url, body["1"].encode(), connections=16, seconds=2, rows_per_request=1, authorization=authorization)
        yield {"url": url, "pid": proc.pid, "authorization": authorization}
    finally:
        stop_process(proc)


def run_mlflow(model: dict[str, Any], body: dict[str, str], *, seconds: float, warmup_s: float,
               logs: Path) -> list[LoadResult]:
    from mlray import settings

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri(),
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    cmd = [str(Path(bin_dir, "mlflow")), "models", "serve", "-m", f"models:/{MODEL}/{model['version']}",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    proc = start_process(cmd, env=env, ready_url=f"http://127.0.0.1:{port}/ping", log=logs / "mlflow.log")
    try:
        url = f"http://127.0.0.1:{port}/invocations"
        _check(url, body["1"], None)
        return measure(url, body, seconds=seconds, warmup_s=warmup_s, authorization=None, pid=proc.pid)
    finally:
        stop_process(proc)


def _check(url: str, body: str, authorization: str | None) -> None:
    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    answer = requests.post(url, data=body, headers=headers, timeout=30)
    if answer.status_code != 200:
        raise RuntimeError(f"POST {url} answered {answer.status_code}: {answer.text[:500]}")


# -- Serve: each configuration in its own driver process and Ray cluster -----------------------------------------


def run_trial(spec: dict[str, Any], *, logs: Path, timeout_s: float = 900) -> dict[str, Any]:
    name = spec["name"].replace("+", "_").replace(" ", "_")
    spec_file, out_file, log = logs / f"trial-{name}.json", logs / f"trial-{name}.out.json", logs / f"trial-{name}.log"
    spec_file.write_text(json.dumps({**spec, "out": str(out_file)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    print(f"  Serve trial {spec['name']!r}: env {spec['env'] or '{}'}", flush=True)
    with log.open("wb") as out:
        done = subprocess.run([sys.executable, "-m", "bench._serve.serve_trial", str(spec_file)], cwd=REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
    if done.returncode != 0 or not out_file.exists():
        raise RuntimeError(f"Serve trial {spec['name']!r} failed ({done.returncode}); its log {log}:\n"
                           f"{log.read_text()[-3000:]}")
    return json.loads(out_file.read_text())


def trial_spec(name: str, env: dict[str, str], *, body: dict[str, str], variants: list[dict[str, Any]],
               loads: list[tuple[int, int]], seconds: float, warmup_s: float, args: argparse.Namespace,
               **extra: Any) -> dict[str, Any]:
    app_args = json.loads(args.app_args) if args.app_args else {}
    trial_env = dict(env)
    if args.api_key:
        app_args.setdefault("auth", {"enabled": True})
        trial_env["MLRAY_API_KEYS"] = args.api_key  # the app's default key source (auth.keys_env)
    return {"name": name, "env": trial_env, "model": MODEL, "rows": body, "variants": variants,
            "loads": [{"connections": c, "rows": r} for c, r in loads], "seconds": seconds, "warmup_s": warmup_s,
            "authorization": f"Bearer {args.api_key}" if args.api_key else None, "app_args": app_args, **extra}


def sweep(body: dict[str, str], *, args: argparse.Namespace, seconds: float, warmup_s: float, logs: Path,
          reference: dict[str, Any] | None) -> list[dict[str, Any]]:
    # Rollover (replicas replaced under load) where the drain differs: Serve's proxy, and 30 s direct ingress.
    return [run_trial(trial_spec(mode, MODES[mode], body=body, variants=SWEEP_VARIANTS[mode], loads=[(16, 1)],
                                 seconds=seconds, warmup_s=warmup_s, args=args, audit=True, time_shutdown=True,
                                 backpressure=mode in ("default", "ha+to"), rollover=mode in ("default", "ha+to"),
                                 reference=reference),
                      logs=logs)
            for mode in args.modes]


def serve_settings() -> tuple[dict[str, str], str]:
    """The Serve environment for mlray's row: mlray's own, once it sets one, else this file's recommendation.

    Returns the environment and where it came from. Every trial gets mlray's per-head HAProxy files and its
    loopback wrapper (``serve_trial.isolation_env``).
    """
    from mlray import settings

    own = {k: v for k, v in settings.ray_process_env().items() if k.startswith("RAY_SERVE_")}
    if own:
        return own, "mlray.settings.ray_process_env()"
    return RECOMMENDED_ENV, "mlray.cluster.serve_env.FAST_SERVE_ENV (what `ray start` gets from mlray)"


# -- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3-s runs instead of 6, no rollover check")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per load run (default 6, quick 3)")
    parser.add_argument("--home", default=None, help="MLRAY_HOME to use/reuse (default: a new temporary one)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--api-key", default=os.environ.get("MLRAY_BENCH_API_KEY"),
                        help="send 'Authorization: Bearer KEY' and switch the app's auth on (env MLRAY_BENCH_API_KEY)")
    parser.add_argument("--app-args", default=None, help="JSON merged into the Serve app's args")
    parser.add_argument("--replicas", type=int, default=1, help="fixed replica count (the YAML's autoscaling off)")
    parser.add_argument("--batching", choices=["on", "off"], default=None, help="default: the YAML's setting")
    parser.add_argument("--access-log", choices=["on", "off"], default=None,
                        help="Serve's per-request access log (default: the app's `access_log`, off)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="extra rounds of single rows at 16 clients, mlray then plain (default 6, quick 4); "
                             "the p99 and req/s targets read the medians over all rounds")
    parser.add_argument("--skip", nargs="*", default=[], choices=["plain", "mlflow", "mlray"])
    parser.add_argument("--sweep", action="store_true", help="also compare Serve settings (modes x variants)")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES), help="modes for --sweep")
    parser.add_argument("--out", default=None, help="markdown file (default bench/results/serve-DATE.md)")
    args = parser.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 6.0)
    warmup_s = 2.0 if args.quick else 3.0
    wrk_binary()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["MLRAY_HOME"] = str(Path(args.home or tempfile.mkdtemp(prefix="mlray-bench-serve-")).absolute())
    logs = Path(tempfile.mkdtemp(prefix="mlray-bench-serve-logs-"))
    started, load_before = time.monotonic(), os.getloadavg()
    authorization = f"Bearer {args.api_key}" if args.api_key else None

    model = prepare_model(epochs=args.epochs)
    body = bodies(model)
    serve_env, env_source = serve_settings()
    results: dict[str, list[LoadResult]] = {}
    if "mlflow" not in args.skip:
        print("Measuring `mlflow models serve`", flush=True)
        results["mlflow"] = run_mlflow(model, body["mlflow"], seconds=seconds, warmup_s=warmup_s, logs=logs)
    serve_main, sweep_results = None, None
    plain = (plain_server(model, body["v1"], logs=logs, authorization=authorization) if "plain" not in args.skip
             else nullcontext(None))
    with plain as reference:
        if "mlray" not in args.skip:
            # The plain process is measured right after each of mlray's runs (same moment, same neighbours).
            print("Measuring mlray's Serve app" + (" and the plain FastAPI process, run by run" if reference else ""),
                  flush=True)
            def choice(value: str | None) -> bool | None:  # None: the app's own setting
                return None if value is None else value == "on"
            variant = {"name": "main", "batching": choice(args.batching), "replicas": args.replicas,
                       "access_log": choice(args.access_log)}
            serve_main = run_trial(trial_spec(
                "main", serve_env, body=body["v1"], variants=[variant], loads=LOADS, seconds=seconds,
                warmup_s=warmup_s, args=args, audit=True, backpressure=True,
                rollover=not args.quick, time_shutdown=True, reference=reference,
                repeat=args.repeat if args.repeat is not None else (4 if args.quick else 6)), logs=logs)
            results["mlray"] = [LoadResult.from_dict(raw) for raw in serve_main["variants"][0]["loads"]]
            if reference:
                results["plain"] = [LoadResult.from_dict(raw) for raw in serve_main["variants"][0]["reference"]]
        elif reference:
            print("Measuring the plain FastAPI + uvicorn process", flush=True)
            results["plain"] = measure(reference["url"], body["v1"], seconds=seconds, warmup_s=warmup_s,
                                       authorization=authorization, pid=reference["pid"])
        if args.sweep:
            if not reference:
                raise SystemExit("--sweep compares against the plain process: do not --skip plain")
            print("Comparing Serve settings", flush=True)
            sweep_results = sweep(body["v1"], args=args, seconds=seconds, warmup_s=warmup_s, logs=logs,
                                  reference=reference)

    context = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
        "load_before": load_before, "load_after": os.getloadavg(), "seconds": seconds,
        "wall_s": time.monotonic() - started, "version": model["version"], "replicas": args.replicas,
        "batching": args.batching or "as the YAML", "access_log": args.access_log or "as the app (off)",
        "env": serve_env,
        "env_source": env_source, "api_key": bool(args.api_key), "logs": str(logs),
    }
    text = report.render(results, serve_main=serve_main, sweep=sweep_results, context=context)
    print("\n" + text)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"serve-{dt.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nWritten to {out} (trial logs in {logs})")


if __name__ == "__main__":
    main()
