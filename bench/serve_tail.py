"""Where single-row latency goes at 16 clients: mlray's app against bare Serve apps, on the same cluster.

"bare Serve" is the plain baseline of ``bench/serve.py`` (``bench/_serve/plain_app.py``: FastAPI, one async
route, the same model and response body) wrapped by ``@serve.ingress``, so it pays what Serve costs and
nothing of mlray's (registry following, admission, auth, metrics, validation). "minimal Serve" is the
issue's bare app: a deployment whose ``__call__`` takes Starlette's request, no FastAPI. All run with the
same replica count behind the same HAProxy, in turns (mlray, bare, minimal, mlray, ...), so all see the
same moments of a shared machine. Each environment given by ``--compare`` gets its own Ray cluster (Serve reads
its settings when its processes start); the first is mlray's (``mlray.cluster.serve_env.FAST_SERVE_ENV``).

    python bench/serve_tail.py                                   # ~4 min: 3 rounds of 10 s
    python bench/serve_tail.py --compare RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1000   # + throughput mode's own buffer

A digits version at ``@champion`` in ``$MLRAY_HOME`` is served (trained first if there is none; a new
temporary home by default). Prints a table: req/s, p50 and p99 (medians over the rounds, and each round's p99).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _child(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs in its own process: start Ray with the environment, deploy the three apps, measure in turns."""
    from bench._serve.serve_trial import Variant, _plan_for, _start_ray, check_answer, free_port, isolation_env
    from bench._serve.wrk import run_wrk

    rundir = Path(tempfile.mkdtemp(prefix="mlrb-", dir="/tmp"))
    os.environ.update({**spec["env"], **isolation_env(rundir), "BENCH_MODEL": spec["model"],
                       "BENCH_VERSION": str(spec["version"])})
    from ray import serve

    from bench._serve.plain_app import create_app
    from mlray.serving.deploy import deploy, load_plan

    @serve.deployment(num_replicas=spec["replicas"], ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
    @serve.ingress(create_app)
    class Bare:
        pass

    @serve.deployment(num_replicas=spec["replicas"], ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
    class Minimal:
        """The issue's bare Serve app: a deployment's ``__call__`` on Starlette's request, no FastAPI."""

        def __init__(self) -> None:
            self.app = create_app()  # loads the model; its route is not used
            self.predict = next(r.endpoint for r in self.app.routes if getattr(r, "path", "").endswith(":predict"))

        async def __call__(self, request: Any) -> Any:
            return await self.predict(spec["model"], request)

    body = json.dumps({"instances": [[float(i % 16) for i in range(64)]]})
    out: list[dict[str, Any]] = []
    _start_ray()
    try:
        port = free_port()
        base = load_plan(None, overrides={"model": spec["model"]}, host="127.0.0.1", port=port)
        url = deploy(_plan_for(base, Variant(name="mlray", replicas=spec["replicas"])))
        mlray_url = f"{url}/v1/models/{spec['model']}:predict"
        serve.run(cast(serve.Deployment, Bare).bind(), name="bare", route_prefix="/bare")
        bare_url = f"http://127.0.0.1:{port}/bare/v1/models/{spec['model']}:predict"
        serve.run(cast(serve.Deployment, Minimal).bind(), name="minimal", route_prefix="/minimal")
        minimal_url = f"http://127.0.0.1:{port}/minimal"
        apps = [("mlray", mlray_url), ("bare Serve", bare_url), ("minimal Serve", minimal_url)]
        for _, target in apps:
            check_answer(target, body, None)
            run_wrk(target, body.encode(), connections=16, seconds=3, rows_per_request=1)  # warm-up
        for round_ in range(spec["rounds"]):
            for name, target in apps:
                load = run_wrk(target, body.encode(), connections=16, seconds=spec["seconds"], rows_per_request=1)
                out.append({"app": name, "round": round_, **load.to_dict()})
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
        shutil.rmtree(rundir, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--compare", nargs="*", default=[], metavar="KEY=VALUE",
                        help="a second cluster: mlray's settings with these changed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(spec["out"]).write_text(json.dumps(_child(spec)))
        return

    from mlray.cluster.serve_env import FAST_SERVE_ENV

    started = time.monotonic()
    home = os.environ.setdefault("MLRAY_HOME", tempfile.mkdtemp(prefix="mlray-bench-tail-"))
    from bench.serve import MODEL, prepare_model

    model, version = MODEL, prepare_model(epochs=3)["version"]
    settings = [("mlray's settings", dict(FAST_SERVE_ENV))]
    if args.compare:
        changed = dict(item.split("=", 1) for item in args.compare)
        settings.append((" ".join(args.compare), {**FAST_SERVE_ENV, **changed}))
    rows: list[tuple[str, dict[str, Any]]] = []
    load_before = os.getloadavg()[0]
    for label, env in settings:
        with tempfile.TemporaryDirectory() as tmp:
            spec = {"env": env, "model": model, "version": version, "replicas": args.replicas,
                    "rounds": args.rounds, "seconds": args.seconds, "out": f"{tmp}/out.json"}
            Path(tmp, "spec.json").write_text(json.dumps(spec))
            subprocess.run([sys.executable, __file__, "--child", f"{tmp}/spec.json"], check=True, cwd=ROOT,
                           env={**os.environ, "MLRAY_HOME": home}, timeout=900)
            rows += [(label, r) for r in json.loads(Path(spec["out"]).read_text())]
    print(f"\n# bench/serve_tail.py: single rows, 16 clients, {args.replicas} replica(s), {args.rounds} rounds of "
          f"{args.seconds:.0f} s in turns; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"{(time.monotonic() - started) / 60:.1f} min\n")
    print("| settings | app | req/s (median) | p50 ms (median) | p99 ms (median) | p99 ms, each round |")
    print("|---|---|---|---|---|---|")
    for label, _ in settings:
        for app in ("mlray", "bare Serve", "minimal Serve"):
            runs = [r for lab, r in rows if lab == label and r["app"] == app]
            each = ", ".join(f"{r['p99_ms']:.0f}" for r in runs)
            print(f"| {label} | {app} | {statistics.median(r['req_per_s'] for r in runs):,.0f} | "
                  f"{statistics.median(r['p50_ms'] for r in runs):.1f} | "
                  f"{statistics.median(r['p99_ms'] for r in runs):.1f} | "
                  f"{each} |")


if __name__ == "__main__":
    main()
