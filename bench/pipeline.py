"""Time from `pipeline run` to champion for digits on this machine, split by step, and the requests each
version answered meanwhile; the baseline, measured in the same run, is the same training on its own
(`mlray train`), which is the floor of any pipeline.

    python bench/pipeline.py                      # ~4 min on 2 cores: baseline training, then the pipeline
    python bench/pipeline.py --hold 10            # shorter canary holds

A local cluster in a temporary MLRAY_HOME; the default config's canary (5 % -> 25 % -> 50 %, min 20
challenger requests per weight) under steady client load (2 threads, tests/helpers.SteadyLoad).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hold", type=float, default=30.0, help="canary.hold_s")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mlray-bench-pipeline-"))
    os.environ.update({"MLRAY_HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from mlray._ray.env import train_env
    from mlray.cluster.serve_env import serve_head_env

    os.environ.update(train_env())
    os.environ.update(serve_head_env(home))
    import ray
    import yaml
    from ray import serve
    from ray.cluster_utils import Cluster

    from mlray.config import load_config
    from mlray.pipeline import parse_pipeline, run
    from mlray.registry import promote
    from mlray.serving.deploy import ServePlan, deploy
    from mlray.training.train import train
    from tests.helpers import SteadyLoad, free_port

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False,
                                                            "object_store_memory": 300 * 1024 * 1024})
    ray.init(address=cluster.address)
    try:
        job = load_config(ROOT / "configs/digits.yaml", overrides={"train.epochs": args.epochs})
        started = time.monotonic()
        baseline = train(job)
        train_alone = time.monotonic() - started
        promote("digits", version=baseline.version, alias="champion")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        url = deploy(ServePlan(app_name="digits", route_prefix="/", host="127.0.0.1", port=port,
                               args={"model": "digits", "challenger": {"mode": "split", "weight": 0.0}},
                               deployment_options={}))
        raw = yaml.safe_load((ROOT / "configs/pipeline.yaml").read_text())
        raw.update(job=str(ROOT / "configs/digits.yaml"), overrides={"train.epochs": args.epochs})
        raw["canary"]["hold_s"] = args.hold
        with SteadyLoad(f"{url}/v1/models/digits:predict", row=[0.0] * 64, threads=2, max_requests=1_000_000,
                        max_seconds=1200, pause_s=0.01) as load:
            started = time.monotonic()
            result = run(parse_pipeline(raw), pipeline_id="bench", progress=print)
            total = time.monotonic() - started
        answered = Counter((version, role) for status, version, role in load.results if status == 200)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print(f"\noutcome: {result.outcome} ({result.reason})\n")
    print("| step     | seconds |")
    print("|----------|---------|")
    for name, step in result.steps.items():
        print(f"| {name:<8} | {step.seconds or 0:7.1f} |")
    print(f"| total    | {total:7.1f} |")
    print(f"\nbaseline, the same training alone: {train_alone:.1f} s\n")
    print("| version | role       | requests |")
    print("|---------|------------|----------|")
    for (version, role), count in sorted(answered.items()):
        print(f"| {version:<7} | {role:<10} | {count:8d} |")
    print(f"\nfailed requests: {len(load.failures())}")


if __name__ == "__main__":
    main()
