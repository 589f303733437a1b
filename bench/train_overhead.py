"""mlray's distributed training against a hand-written PyTorch DDP loop, measured in the same run.

Both sides train the same model (the CNN, so DDP's all-reduce and compute are real), on the same data,
with the same per-worker batch size and the same number of processes (gloo on CPU). Throughput is
training samples per second over the epochs after a warm-up epoch, data loading included: Ray Data
shards (materialized once in the object store, `data.cache: true`) for mlray, in-memory tensors with a
DistributedSampler for the hand-written loop.

    python bench/train_overhead.py [--rows 60000] [--epochs 4] [--workers 2]

Prints a table; the target is mlray >= 0.9x the hand-written loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlray.config import parse_config  # noqa: E402
from mlray.data import _hash_uniform, _split_ids, synthetic_batch  # noqa: E402
from mlray.loop import LoopConfig, new_training_state, train_epoch  # noqa: E402
from mlray.models import ModelSpec  # noqa: E402

FEATURES, CLASSES, SEED = 64, 10, 42


def _train_rows(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly the rows mlray's synthetic source puts in its training split."""
    ids = np.arange(rows, dtype=np.uint64)
    data = synthetic_batch(ids, features=FEATURES, classes=CLASSES, seed=SEED)
    split = _split_ids(_hash_uniform(ids, SEED), 0.15, 0.15)
    return data["x"][split == 0], data["y"][split == 0]


def _hand_written_worker(rank: int, world: int, port: int, rows: int, epochs: int, batch: int,
                         loop_cfg: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y = (torch.from_numpy(a) for a in _train_rows(rows))
    model, optimizer, _ = new_training_state(LoopConfig(**loop_cfg))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    sampler = torch.utils.data.DistributedSampler(torch.utils.data.TensorDataset(x, y), num_replicas=world,
                                                  rank=rank, shuffle=True, seed=SEED)
    times = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        index = torch.tensor(list(sampler))
        started = time.perf_counter()
        batches = ((x[index[i:i + batch]], y[index[i:i + batch]]) for i in range(0, len(index), batch))
        stats = train_epoch(ddp, optimizer, batches)
        dist.barrier()
        times.append((time.perf_counter() - started, stats.count * world))
    if rank == 0:
        Path(out).write_text(repr(times))
    dist.destroy_process_group()


def hand_written(rows: int, epochs: int, workers: int, batch: int, loop_cfg: dict) -> list[tuple[float, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/times"
        port = 29500 + os.getpid() % 1000
        mp.spawn(_hand_written_worker, args=(workers, port, rows, epochs, batch, loop_cfg, out), nprocs=workers)
        return eval(Path(out).read_text())  # noqa: S307 - our own file of floats


def mlray_side(rows: int, epochs: int, workers: int, batch: int) -> list[tuple[float, int]]:
    import ray

    from mlray.tracking import client
    from mlray.train import train

    cfg = parse_config({
        "name": "bench-overhead", "seed": SEED,
        # cache: the hand-written loop holds its data in memory; mlray holds it in the object store
        "data": {"source": "synthetic", "cache": True,
                 "synthetic": {"rows": rows, "features": FEATURES, "classes": CLASSES}},
        "model": {"arch": "cnn", "hidden": [32, 128], "dropout": 0.0},
        "train": {"num_workers": workers, "epochs": epochs, "batch_size": batch, "lr": 0.001},
    })
    ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False)
    try:
        result = train(cfg)
    finally:
        ray.shutdown()
    history = client().get_metric_history(result.run_id, "epoch_seconds")
    return [(m.value, 0) for m in sorted(history, key=lambda m: m.step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("MLRAY_HOME", tempfile.mkdtemp(prefix="mlray-bench-"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    train_rows = len(_train_rows(args.rows)[1])
    spec = ModelSpec(arch="cnn", num_features=FEATURES, num_classes=CLASSES, hidden=(32, 128), dropout=0.0)
    x, _ = _train_rows(min(args.rows, 5000))
    loop_cfg = LoopConfig(model=spec.to_dict(), mean=x.mean(0).tolist(), std=x.std(0).tolist(),
                          epochs=args.epochs, batch_size=args.batch, lr=0.001, weight_decay=0.0, seed=SEED).to_dict()

    hand = hand_written(args.rows, args.epochs, args.workers, args.batch, loop_cfg)
    ours = mlray_side(args.rows, args.epochs, args.workers, args.batch)
    # epoch 0 is warm-up on both sides (process start, first Ray Data execution)
    hand_sps = train_rows / statistics.median(t for t, _ in hand[1:])
    ours_sps = train_rows / statistics.median(t for t, _ in ours[1:])
    print(f"\ntrain_overhead: CNN ({sum(p.numel() for p in new_training_state(LoopConfig(**loop_cfg))[0].parameters())}"
          f" params), {train_rows} training rows, {args.workers} processes, batch {args.batch}/worker, gloo, "
          f"median of epochs 2..{args.epochs}")
    print(f"| {'side':<28} | {'samples/s':>10} | {'epoch s (median)':>16} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 18}|")
    print(f"| {'hand-written DDP (torch.mp)':<28} | {hand_sps:>10.0f} | {train_rows / hand_sps:>16.2f} |")
    print(f"| {'mlray (Ray Train + Ray Data)':<28} | {ours_sps:>10.0f} | {train_rows / ours_sps:>16.2f} |")
    print(f"\nratio mlray / hand-written: {ours_sps / hand_sps:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
