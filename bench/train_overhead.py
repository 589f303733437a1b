"""mlray's distributed training against a hand-written PyTorch DDP loop, measured in the same run.

Both sides train the same model on the same data, with the same per-worker batch size and the same number
of processes (gloo on CPU). Throughput is training samples per second over the epochs after a warm-up
epoch, data loading included: Ray Data shards (materialized once in the object store, `data.cache: true`)
for mlray, in-memory tensors with a DistributedSampler for the hand-written loop.

``--model cnn`` (default): mlray's built-in CNN on the synthetic source. ``--model user``: a user factory
from outside mlray (tests/fixtures/userproject, ``usermodel.nets:deep_mlp``, 4 x 512) on a synthetic table
written to Parquet and read by mlray as a file source.

    python bench/train_overhead.py [--model cnn|user] [--rows 60000] [--epochs 4] [--workers 2]

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
from mlray.models import ModelSpec  # noqa: E402
from mlray.training.data import _hash_uniform, _row_keys, _split_ids, synthetic_batch  # noqa: E402
from mlray.training.loop import LoopConfig, new_training_state, train_epoch  # noqa: E402

FEATURES, CLASSES, SEED = 64, 10, 42
USERPROJECT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "userproject"
USER_FACTORY = "usermodel.nets:deep_mlp"


def _train_rows(rows: int, model: str = "cnn") -> tuple[np.ndarray, np.ndarray]:
    """Exactly the rows mlray puts in its training split: by row id for the synthetic source, by a hash of
    the row's values for a file."""
    ids = np.arange(rows, dtype=np.uint64)
    data = synthetic_batch(ids, features=FEATURES, classes=CLASSES, seed=SEED)
    keys = ids if model == "cnn" else _row_keys(data["x"])
    split = _split_ids(_hash_uniform(keys, SEED), 0.15, 0.15)
    return data["x"][split == 0], data["y"][split == 0]


def write_parquet(rows: int, folder: Path) -> Path:
    """The synthetic rows (the same ones as above) as a Parquet folder of 100k-row files: f0..f63, label."""
    import pandas as pd

    data = synthetic_batch(np.arange(rows, dtype=np.uint64), features=FEATURES, classes=CLASSES, seed=SEED)
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, rows, 100_000)):
        frame = pd.DataFrame(data["x"][start : start + 100_000], columns=[f"f{i}" for i in range(FEATURES)])
        frame["label"] = data["y"][start : start + 100_000]
        frame.to_parquet(folder / f"part-{part:04d}.parquet")
    return folder


def _hand_written_worker(rank: int, world: int, port: int, rows: int, epochs: int, batch: int,
                         loop_cfg: dict, out: str, model_kind: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.append(str(USERPROJECT))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y = (torch.from_numpy(a) for a in _train_rows(rows, model_kind))
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


def hand_written(rows: int, epochs: int, workers: int, batch: int, loop_cfg: dict, model_kind: str
                 ) -> list[tuple[float, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/times"
        port = 29500 + os.getpid() % 1000
        mp.spawn(_hand_written_worker, args=(workers, port, rows, epochs, batch, loop_cfg, out, model_kind),
                 nprocs=workers)
        return eval(Path(out).read_text())  # noqa: S307 - our own file of floats


def mlray_side(rows: int, epochs: int, workers: int, batch: int, parquet: Path | None) -> list[tuple[float, int]]:
    import ray

    from mlray.registry.tracking import client
    from mlray.training.train import train

    # cache: the hand-written loop holds its data in memory; mlray holds it in the object store
    if parquet is None:
        data = {"source": "synthetic", "cache": True,
                "synthetic": {"rows": rows, "features": FEATURES, "classes": CLASSES}}
        model = {"arch": "cnn", "hidden": [32, 128], "dropout": 0.0}
    else:
        data = {"source": str(parquet), "label_column": "label", "num_classes": CLASSES, "cache": True}
        model = {"factory": USER_FACTORY}
    cfg = parse_config({
        "name": "bench-overhead", "seed": SEED, "data": data, "model": model,
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
    parser.add_argument("--model", choices=("cnn", "user"), default="cnn")
    args = parser.parse_args()
    os.environ.setdefault("MLRAY_HOME", tempfile.mkdtemp(prefix="mlray-bench-"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path.append(str(USERPROJECT))  # the user factory, for the driver (the workers get it from there too)

    train_rows = len(_train_rows(args.rows, args.model)[1])
    if args.model == "cnn":
        spec = ModelSpec(factory="mlray.models:cnn", num_features=FEATURES, num_outputs=CLASSES,
                         kwargs={"hidden": [32, 128], "dropout": 0.0})
    else:
        spec = ModelSpec(factory=USER_FACTORY, num_features=FEATURES, num_outputs=CLASSES)
    x, _ = _train_rows(min(args.rows, 5000), args.model)
    loop_cfg = LoopConfig(model=spec.to_dict(), mean=x.mean(0).tolist(), std=x.std(0).tolist(),
                          epochs=args.epochs, batch_size=args.batch, lr=0.001, weight_decay=0.0, seed=SEED).to_dict()

    parquet = write_parquet(args.rows, Path(os.environ["MLRAY_HOME"]) / "bench-table") if args.model == "user" \
        else None
    hand = hand_written(args.rows, args.epochs, args.workers, args.batch, loop_cfg, args.model)
    ours = mlray_side(args.rows, args.epochs, args.workers, args.batch, parquet)
    # epoch 0 is warm-up on both sides (process start, first Ray Data execution)
    hand_sps = train_rows / statistics.median(t for t, _ in hand[1:])
    ours_sps = train_rows / statistics.median(t for t, _ in ours[1:])
    params = sum(p.numel() for p in new_training_state(LoopConfig(**loop_cfg))[0].parameters())
    print(f"\ntrain_overhead: {spec.factory} ({params}"
          f" params), {train_rows} training rows, {args.workers} processes, batch {args.batch}/worker, gloo, "
          f"median of epochs 2..{args.epochs}")
    print(f"| {'side':<28} | {'samples/s':>10} | {'epoch s (median)':>16} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 18}|")
    print(f"| {'hand-written DDP (torch.mp)':<28} | {hand_sps:>10.0f} | {train_rows / hand_sps:>16.2f} |")
    print(f"| {'mlray (Ray Train + Ray Data)':<28} | {ours_sps:>10.0f} | {train_rows / ours_sps:>16.2f} |")
    print(f"\nratio mlray / hand-written: {ours_sps / hand_sps:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
