"""One Serve configuration, measured in its own driver process with its own local Ray cluster.

Serve reads its settings (``RAY_SERVE_*``) from the environment when its processes start, so each mode gets
a fresh process: the environment is set first, then Ray is started (the controller, proxy, HAProxy and
replicas inherit it), then mlray's app is deployed through ``mlray.serving.deploy`` (the CLI's path) once
per variant (batching, replicas), and wrk measures it. The trial can also replace every replica under load,
probe backpressure, list the sockets its processes listen on, and time ``serve.shutdown()``.

    python -m bench._serve.serve_trial spec.json    # run by bench/serve.py from the repo root; writes spec["out"]
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench._serve.listeners import listeners, summarize
from bench._serve.wrk import run_wrk

# The settings this benchmark compares; each is the environment of the Ray cluster it starts.
MODES: dict[str, dict[str, str]] = {
    "default": {},
    "ha": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "to": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "ha+to": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "ha+to+nohapm": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                     "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"},
}

@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    batching: bool | None = None  # None: the app's setting (the YAML's `batching.enabled`)
    replicas: int = 1
    max_ongoing_requests: int | None = None  # None: what the app asks for
    access_log: bool | None = None  # Serve's per-request access log line; None: the app's `access_log` (off)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def isolation_env(rundir: Path) -> dict[str, str]:
    """mlray's per-head HAProxy ports, files and loopback wrapper (:func:`mlray.cluster.serve_env.haproxy_env`)."""
    from mlray.cluster.serve_env import haproxy_env

    return {**haproxy_env(rundir), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _plan_for(base: Any, variant: Variant, extra_options: dict[str, Any] | None = None) -> Any:
    """The YAML's plan with a fixed replica count (its autoscaling dropped), batching as the variant says."""
    options = {k: v for k, v in base.deployment_options.items() if k != "autoscaling_config"}
    options["num_replicas"] = variant.replicas
    if variant.max_ongoing_requests is not None:
        options["max_ongoing_requests"] = variant.max_ongoing_requests
    if variant.access_log is not None:
        options["logging_config"] = {**options.get("logging_config", {}), "enable_access_log": variant.access_log}
    options.update(extra_options or {})
    args = base.args if variant.batching is None else _merge(base.args, {"batching": {"enabled": variant.batching}})
    return dataclasses.replace(base, args=args, deployment_options=options)


def check_answer(url: str, body: str, authorization: str | None) -> None:
    """One request before any load: a server that answers 4xx/5xx would otherwise be timed as fast."""
    import requests

    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    answer = requests.post(url, data=body, headers=headers, timeout=30)
    if answer.status_code != 200 or "predictions" not in answer.json():
        raise RuntimeError(f"POST {url} answered {answer.status_code}: {answer.text[:500]}")


def _descendants(name: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() == name:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _start_ray(attempts: int = 2) -> None:
    """A new local cluster (``address="local"``: never one that `ray start` left running on this machine).

    On a machine loaded by other work the raylet sometimes misses Ray's start-up deadline; try once more.
    """
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            return
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for a start-up timeout
            ray.shutdown()
            if attempt == attempts:
                raise
            print(f"Ray did not start ({err}); trying again", flush=True)


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    rundir = Path(tempfile.mkdtemp(prefix="mlrb-", dir="/tmp"))
    env = {**spec["env"], **isolation_env(rundir)}
    os.environ.update(env)  # before Ray starts: its processes inherit it

    import ray
    from ray import serve

    from mlray.serving.deploy import deploy, load_plan

    result: dict[str, Any] = {"name": spec["name"], "env": spec["env"],
                              "variants": [], "haproxy_orphans": 0}
    rows = spec["rows"]  # {"1": body of 1 row, "256": ...}
    ref = spec.get("reference")  # {"url": ...} of a plain server to measure after each load, or None
    started = time.monotonic()
    _start_ray()
    result["ray_init_s"] = time.monotonic() - started
    haproxies: list[psutil.Process] = []
    try:
        base = load_plan(spec.get("serve_config"), overrides={"model": spec["model"]}, host="127.0.0.1",
                         port=free_port())
        base = dataclasses.replace(base, args=_merge(base.args, spec.get("app_args") or {}))
        for raw in spec["variants"]:
            variant = Variant(**raw)
            t0 = time.monotonic()
            url = deploy(_plan_for(base, variant))
            deploy_s = time.monotonic() - t0
            predict_url = f"{url}/v1/models/{spec['model']}:predict"
            check_answer(predict_url, rows["1"], spec.get("authorization"))
            run_wrk(predict_url, rows["1"].encode(), connections=16, seconds=spec["warmup_s"], rows_per_request=1,
                    authorization=spec.get("authorization"))
            loads, reference = [], []
            for load in spec["loads"]:
                body = rows[str(load["rows"])].encode()
                loads.append(run_wrk(predict_url, body, connections=load["connections"], seconds=spec["seconds"],
                                     rows_per_request=load["rows"], authorization=spec.get("authorization"),
                                     cpu_of=[os.getpid()]).to_dict())  # this driver's tree: all of Ray
                if ref:  # the plain process, measured right after: the same moment's share of a busy machine
                    reference.append(run_wrk(ref["url"], body, connections=load["connections"],
                                             seconds=spec["seconds"], rows_per_request=load["rows"],
                                             authorization=ref.get("authorization"), cpu_of=[ref["pid"]]).to_dict())
            repeats = []  # more 16-client single-row rounds, mlray then plain: p99 varies 2x between runs here
            for _ in range(spec.get("repeat", 0)):
                ours = run_wrk(predict_url, rows["1"].encode(), connections=16, seconds=spec["seconds"],
                               rows_per_request=1, authorization=spec.get("authorization"), cpu_of=[os.getpid()])
                theirs = (run_wrk(ref["url"], rows["1"].encode(), connections=16, seconds=spec["seconds"],
                                  rows_per_request=1, authorization=ref.get("authorization"), cpu_of=[ref["pid"]])
                          if ref else None)
                repeats.append({"mlray": ours.to_dict(), "plain": theirs.to_dict() if theirs else None})
            result["variants"].append({"variant": dataclasses.asdict(variant), "deploy_s": deploy_s, "loads": loads,
                                       "reference": reference, "repeats": repeats})
        haproxies = _descendants("haproxy")
        if spec.get("rollover"):
            last = Variant(**spec["variants"][-1])
            result["rollover"] = _probe_rollover(base, spec, deploy, last)
        if spec.get("backpressure"):
            result["backpressure"] = _probe_backpressure(base, spec, deploy)
        haproxies += [p for p in _descendants("haproxy") if p not in haproxies]
        if spec.get("audit"):  # last: after every redeploy, so HAProxy has been reloaded several times
            result["listeners"] = summarize(listeners())
            # HAProxy's admin socket is created `mode 666 level admin`: only its folder's mode keeps other
            # local users out. Ray's default folder is /tmp/haproxy-serve (0755); this run's is private.
            result["haproxy_files"] = [{"path": str(path.relative_to(rundir)), "mode": oct(path.stat().st_mode & 0o777),
                                        "kind": "socket" if path.is_socket() else ("dir" if path.is_dir() else "file")}
                                       for path in sorted(rundir.rglob("*")) if "log" not in path.name]
            result["haproxy_dir_mode"] = oct(rundir.stat().st_mode & 0o777)
        if spec.get("time_shutdown"):
            t0 = time.monotonic()
            serve.shutdown()
            result["serve_shutdown_s"] = time.monotonic() - t0
    finally:
        ray.shutdown()
        # HAProxy is a child of the HAProxyManager actor; if that actor dies without serve.shutdown(), the
        # HAProxy process is orphaned and keeps its ports. Count (and end) any that outlived Ray.
        for proc in haproxies:
            if proc.is_running():
                result["haproxy_orphans"] += 1
                proc.kill()
        shutil.rmtree(rundir, ignore_errors=True)
    result["total_s"] = time.monotonic() - started
    return result


def _overload(plan: Any, spec: dict[str, Any], deploy: Any) -> dict[str, Any]:
    url = deploy(plan)
    load = run_wrk(f"{url}/v1/models/{spec['model']}:predict", spec["rows"]["256"].encode(), connections=32,
                   seconds=3, rows_per_request=256, authorization=spec.get("authorization"), count_status=True)
    return {"statuses": load.statuses, "retry_after_headers": load.retry_after, "requests": load.requests}


def _probe_backpressure(base: Any, spec: dict[str, Any], deploy: Any) -> dict[str, Any]:
    """Overload one replica that admits 1 request and queues 1: do the rest get 503 + Retry-After?

    First Serve's own limits (max_ongoing_requests / max_queued_requests, the BackPressureError path), then
    the app's admission control where the app has one (``admission`` in its args), behind the same proxy.
    """
    variant = Variant("backpressure", batching=False)
    serve_limits = {"max_ongoing_requests": 1, "max_queued_requests": 1, "backpressure_config": {"retry_after_s": 1}}
    out = {"serve": _overload(_plan_for(base, variant, serve_limits), spec, deploy)}
    if "admission" in base.args or _app_has_setting("admission"):
        plan = _plan_for(base, variant)
        plan = dataclasses.replace(plan, args=_merge(plan.args, {"admission": {"max_ongoing_requests": 1,
                                                                               "max_queued_requests": 1}}))
        out["app"] = _overload(plan, spec, deploy)
    return out


def _app_has_setting(name: str) -> bool:
    from mlray.serving.config import ServeAppConfig

    return name in ServeAppConfig.model_fields


def _replica_states(app: str) -> dict[str, int]:
    from ray import serve

    from mlray.serving.app import DEPLOYMENT_NAME

    states = serve.status().applications[app].deployments[DEPLOYMENT_NAME].replica_states
    return {getattr(state, "value", str(state)): count for state, count in states.items() if count}


def _probe_rollover(base: Any, spec: dict[str, Any], deploy: Any, current: Variant) -> dict[str, Any]:
    """Replace every replica under steady load (a changed app arg restarts them): does any request fail?

    wrk runs in 2-s chunks (status codes counted) from before the redeploy until the old replicas are
    gone, so the drain of the old replicas and HAProxy's reloads happen under load.
    """
    enabled = current.batching if current.batching is not None else base.args.get("batching", {}).get("enabled", True)
    flipped = dataclasses.replace(current, batching=not enabled)
    plan = _plan_for(base, flipped)
    url = f"{plan.url}/v1/models/{spec['model']}:predict"
    stop, chunks = threading.Event(), []

    def load() -> None:
        while not stop.is_set():
            chunks.append(run_wrk(url, spec["rows"]["1"].encode(), connections=16, seconds=2, rows_per_request=1,
                                  authorization=spec.get("authorization"), count_status=True))

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    time.sleep(2)
    t0 = time.monotonic()
    deploy(plan)
    deployed_s = time.monotonic() - t0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and set(_replica_states(base.app_name)) != {"RUNNING"}:
        time.sleep(0.5)
    old_gone_s = time.monotonic() - t0
    time.sleep(2)
    stop.set()
    loader.join(timeout=30)
    statuses: dict[int, int] = {}
    for chunk in chunks:
        for code, n in chunk.statuses.items():
            statuses[code] = statuses.get(code, 0) + n
    requests_total = sum(c.requests for c in chunks)
    socket_errors = sum(c.errors for c in chunks) - sum(n for code, n in statuses.items() if code >= 400)
    return {"requests": requests_total, "statuses": statuses, "socket_errors": socket_errors,
            "failed": requests_total - statuses.get(200, 0), "deploy_s": deployed_s,
            "old_replicas_gone_s": old_gone_s, "load_s": sum(c.seconds for c in chunks)}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = run_trial(spec)
    Path(spec["out"]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
