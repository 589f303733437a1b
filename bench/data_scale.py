"""Training on Parquet at two sizes: throughput and peak memory of the driver and each worker.

mlray streams file data through Ray Data (read, split by a row hash, standardised with statistics from a
distributed pass, shards fed to workers); nothing is collected into the driver. This benchmark checks
that memory stays flat as the data grows: with 10x the rows, the driver's peak RSS must stay under 1.5x.

    python bench/data_scale.py [--sizes 1000000 10000000] [--epochs 1]

Each size trains in its own driver process (so its peak RSS is its own), on a fresh local Ray cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FEATURES = 16


def write_parquet(folder: Path, rows: int, *, chunk: int = 500_000) -> None:
    """Synthetic 2-class data, written in chunks so the generator never holds it all either."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, FEATURES)) * 2
    for part, start in enumerate(range(0, rows, chunk)):
        n = min(chunk, rows - start)
        y = rng.integers(0, 2, n)
        x = (centres[y] + rng.normal(size=(n, FEATURES)) * 1.5 + 5).astype(np.float32)
        table = pa.table({**{f"f{i}": x[:, i] for i in range(FEATURES)}, "label": y})
        pq.write_table(table, folder / f"part-{part:04d}.parquet")


def _driver(folder: str, epochs: int) -> None:
    """Runs in a child process: trains once, samples worker RSS, prints one JSON line."""
    import resource

    import psutil
    import ray

    from mlray.config import parse_config
    from mlray.registry.tracking import client
    from mlray.training.train import train

    peaks: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and proc.info["memory_info"]:
                    peaks[proc.pid] = max(peaks.get(proc.pid, 0), proc.info["memory_info"].rss)

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, object_store_memory=1_000_000_000)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = train(parse_config({
        "name": "bench-data-scale", "data": {"source": folder, "label_column": "label"},
        "model": {"arch": "mlp", "hidden": [128, 64], "dropout": 0.0},
        "train": {"num_workers": 2, "epochs": epochs, "batch_size": 1024, "lr": 0.003},
    }))
    seconds = time.perf_counter() - started
    stop.set()
    sps = [m.value for m in client().get_metric_history(result.run_id, "samples_per_second")]
    ray.shutdown()
    print(json.dumps({
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": sorted(round(v / 2**20) for v in peaks.values()),
        "samples_per_s": float(np.median(sps)), "wall_s": seconds, "test_accuracy": result.test_accuracy,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1_000_000, 10_000_000])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--driver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        _driver(args.driver, args.epochs)
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="mlray-bench-data-") as tmp:
        for rows in args.sizes:
            folder = Path(tmp) / f"rows-{rows}"
            write_parquet(folder, rows)
            env = {**os.environ, "MLRAY_HOME": str(Path(tmp) / "home"), "RAY_AUTH_MODE": "disabled"}
            done = subprocess.run([sys.executable, __file__, "--driver", str(folder), "--epochs", str(args.epochs)],
                                  env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            results[rows] = json.loads(done.stdout.strip().splitlines()[-1])

    small, large = args.sizes
    print(f"\ndata_scale: Parquet, {FEATURES} features, MLP, 2 workers, batch 1024/worker, {args.epochs} epoch(s)")
    header = ("rows", "samples/s", "driver peak RSS MB", "worker peak RSS MB", "wall s")
    print("| {:>10} | {:>10} | {:>18} | {:>20} | {:>7} |".format(*header))
    print(f"|{'-' * 12}|{'-' * 12}|{'-' * 20}|{'-' * 22}|{'-' * 9}|")
    for rows, r in results.items():
        workers = "/".join(str(w) for w in r["worker_peak_rss_mb"][-2:])
        print(f"| {rows:>10} | {r['samples_per_s']:>10.0f} | {r['driver_peak_rss_mb']:>18.0f} | {workers:>20} "
              f"| {r['wall_s']:>7.1f} |")
    ratio = results[large]["driver_peak_rss_mb"] / results[small]["driver_peak_rss_mb"]
    print(f"\n{large // small}x the rows: driver peak RSS x{ratio:.2f} (target < 1.5)")


if __name__ == "__main__":
    main()
