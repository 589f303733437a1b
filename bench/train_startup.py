"""The fixed cost of a short training on a local cluster: one 1-epoch digits training (2 DDP workers), from
``train()`` to the registered version, with Ray Train's preemption watcher on (Ray's default) and off (what
mlray's local heads set, mlray/_ray/env.py), alternating on the same cluster, after a warm-up training.

    python bench/train_startup.py [--rounds 4]

Prints a table: median and each round's seconds per side. Each epoch of digits is ~0.5 s; the rest is
starting the Train controller, its workers and helper actors, Ray Data's split coordinators, and MLflow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KNOB = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Train v2 hands the driver's value on to its controller


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    os.environ["MLRAY_HOME"] = tempfile.mkdtemp(prefix="mlray-bench-startup-")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from mlray._ray.env import train_env

    os.environ.update(train_env())
    import ray
    from ray.cluster_utils import Cluster

    from mlray.config import parse_config
    from mlray.training.train import train

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "object_store_memory": 300 * 1024 * 1024, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)
    sides = {"watcher on (Ray's default)": "1", "watcher off (mlray's local heads)": "0"}
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    try:
        def once(name: str, value: str) -> float:
            os.environ[KNOB] = value
            started = time.perf_counter()
            train(parse_config({"name": name, "train": {"num_workers": 2, "epochs": 1}}))
            return time.perf_counter() - started

        once("warmup", "1")
        for round_ in range(args.rounds):
            order = list(sides.items()) if round_ % 2 == 0 else list(reversed(sides.items()))
            for side, value in order:
                seconds[side].append(once(f"startup-{value}-{round_}", value))
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("\n| side | median s | each round s |\n|---|---|---|")
    for side, values in seconds.items():
        print(f"| {side} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")


if __name__ == "__main__":
    main()
