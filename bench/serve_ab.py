"""Two versions of mlray's serving, side by side: two Ray clusters at once, wrk rounds alternating between them.

On this 2-core machine one round's req/s and p99 move by 2x from minute to minute, more than most changes
do; only rounds taken in turns on the same machine compare. Each side is its own local Ray cluster (Serve
reads its ``RAY_SERVE_*`` settings when its processes start) serving ``serve_apps/digits.yaml``'s app with a
fixed replica count. A side is the code of a git commit (``--a-ref``/``--b-ref``, checked out in a temporary
worktree) or of this checkout, plus environment settings (``--a-env``/``--b-env KEY=VALUE``) and app args
(``--a-args``/``--b-args`` JSON). Both clusters run throughout, so absolute numbers are lower than one
cluster's; the pairs are what count.

    python bench/serve_ab.py --a-ref HEAD~3                          # ~4 min: that commit (A) against this tree (B)
    python bench/serve_ab.py --b-env RAY_SERVE_HAPROXY_NBTHREAD=1    # a Serve setting
    python bench/serve_ab.py --b-args '{"batching": {"enabled": false}}' --rounds 8

A digits version at ``@champion`` in ``$MLRAY_HOME`` is served (trained first if there is none; a new
temporary home by default). Prints each round and a table: medians and in how many pairs B beat A.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _side(code: str, env: dict[str, str], args: dict[str, Any], replicas: int) -> None:
    """Runs in its own process, with ``code`` first on sys.path: start Ray, deploy, print the URL, wait."""
    sys.path.insert(0, code)
    from bench._serve.serve_trial import Variant, _merge, _plan_for, _start_ray, free_port, isolation_env
    try:
        from mlray.cluster.serve_env import FAST_SERVE_ENV
    except ImportError:  # a side's commit from before mlray/ was grouped by capability
        from mlray.serve_env import FAST_SERVE_ENV  # type: ignore[no-redef]

    rundir = Path(tempfile.mkdtemp(prefix="mlrb-", dir="/tmp"))
    os.environ.update({**FAST_SERVE_ENV, **isolation_env(rundir), **env})
    import dataclasses

    import ray
    from ray import serve

    from mlray.serving.deploy import deploy, load_plan

    _start_ray()
    try:
        base = load_plan(None, overrides={"model": "digits"}, host="127.0.0.1", port=free_port())
        base = dataclasses.replace(base, args=_merge(base.args, args))
        url = deploy(_plan_for(base, Variant(name="ab", replicas=replicas)))
        import mlray

        print(f"side's mlray: {Path(mlray.__file__).parent}", flush=True)
        print("URL", f"{url}/v1/models/digits:predict", flush=True)
        sys.stdin.read()  # until the parent closes it
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(rundir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for side in ("a", "b"):
        parser.add_argument(f"--{side}-ref", default=None, help="a git commit (default: this checkout)")
        parser.add_argument(f"--{side}-env", nargs="*", default=[], metavar="KEY=VALUE")
        parser.add_argument(f"--{side}-args", default="{}", help="JSON merged into the app's args")
    parser.add_argument("--rounds", type=int, default=6, help="pairs of rounds")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.side:
        spec = json.loads(opts.side)
        _side(spec["code"], spec["env"], spec["args"], spec["replicas"])
        return

    sys.path.insert(0, str(ROOT))
    from bench._serve.wrk import run_wrk
    from bench.serve import prepare_model

    home = os.environ.setdefault("MLRAY_HOME", tempfile.mkdtemp(prefix="mlray-bench-ab-"))
    prepare_model(epochs=3)
    worktrees: list[Path] = []
    sides: list[subprocess.Popen[str]] = []
    urls: list[str] = []
    labels: list[str] = []
    try:
        for side in ("a", "b"):
            ref = getattr(opts, f"{side}_ref")
            code = str(ROOT)
            if ref:
                tree = Path(tempfile.mkdtemp(prefix="mlray-ab-"))
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), ref],
                               check=True)
                worktrees.append(tree)
                code = str(tree)
            env = dict(item.split("=", 1) for item in getattr(opts, f"{side}_env"))
            args = json.loads(getattr(opts, f"{side}_args"))
            labels.append(" ".join([ref or "this checkout", *getattr(opts, f"{side}_env"),
                                    *([json.dumps(args)] if args else [])]))
            spec = {"code": code, "env": env, "args": args, "replicas": opts.replicas}
            # PYTHONPATH and the working directory put the side's code ahead of this checkout's editable
            # install, in the driver and in every Ray worker it starts.
            sides.append(subprocess.Popen([sys.executable, __file__, "--side", json.dumps(spec)], cwd=code,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                          env={**os.environ, "MLRAY_HOME": home, "PYTHONPATH": code}))
            assert sides[-1].stdout is not None
            for line in sides[-1].stdout:
                if line.startswith("side's mlray"):
                    print(f"{side.upper()}: {line.strip()}", flush=True)
                if line.startswith("URL "):
                    urls.append(line.split()[1])
                    break
            else:
                raise SystemExit(f"side {side.upper()} did not start; its output is above")
        body = json.dumps({"instances": [[float(i % 16) for i in range(64)]]}).encode()
        for url in urls:
            run_wrk(url, body, connections=16, seconds=3, rows_per_request=1)  # warm-up
        results: list[list[dict[str, Any]]] = [[], []]
        for round_ in range(opts.rounds):
            for i in ((0, 1) if round_ % 2 == 0 else (1, 0)):
                # The side's driver started its Ray cluster, so its process tree is that cluster, HAProxy included.
                load = run_wrk(urls[i], body, connections=16, seconds=opts.seconds, rows_per_request=1,
                               cpu_of=[sides[i].pid]).to_dict()
                results[i].append(load)
                print(f"round {round_ + 1} {'AB'[i]}: {load['req_per_s']:,.0f} req/s, p50 {load['p50_ms']:.1f} ms, "
                      f"p99 {load['p99_ms']:.1f} ms, CPU {load['cpu_ms_per_request']:.2f} ms/req", flush=True)
    finally:
        for proc in sides:
            if proc.stdin:
                proc.stdin.close()
        for proc in sides:
            proc.wait(timeout=180)
        for tree in worktrees:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)

    pairs = list(zip(*results, strict=True))
    print(f"\n# bench/serve_ab.py: single rows, 16 clients, {opts.replicas} replica(s) a side, {opts.rounds} pairs "
          f"of {opts.seconds:.0f}-s rounds in turns; load average {os.getloadavg()[0]:.1f} at the end; "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| side | code and settings | req/s (median) | p50 ms | p99 ms (median) | cluster CPU ms/req | "
          "p99 each round | CPU ms/req each round |")
    print("|---|---|---|---|---|---|---|---|")
    for i, runs in enumerate(results):
        print(f"| {'AB'[i]} | {labels[i]} | {statistics.median(r['req_per_s'] for r in runs):,.0f} | "
              f"{statistics.median(r['p50_ms'] for r in runs):.1f} | "
              f"{statistics.median(r['p99_ms'] for r in runs):.1f} | "
              f"{statistics.median(r['cpu_ms_per_request'] for r in runs):.2f} | "
              f"{', '.join(format(r['p99_ms'], '.0f') for r in runs)} | "
              f"{', '.join(format(r['cpu_ms_per_request'], '.2f') for r in runs)} |")
    print(f"\nB's req/s higher in {sum(b['req_per_s'] > a['req_per_s'] for a, b in pairs)} of {len(pairs)} pairs; "
          f"B's p99 lower in {sum(b['p99_ms'] < a['p99_ms'] for a, b in pairs)} of {len(pairs)}; "
          f"B's CPU per request lower in "
          f"{sum(b['cpu_ms_per_request'] < a['cpu_ms_per_request'] for a, b in pairs)} of {len(pairs)}.")


if __name__ == "__main__":
    main()
