"""The worker side of training: one epoch, evaluation, checkpoint save and restore.

``train_loop_per_worker`` runs on every Ray Train worker. It starts by asking "is there a checkpoint to
resume from?" and ends every epoch with a report, so a restart after a failure takes the normal path.
The step functions below take plain iterables of ``(x, y)`` tensors and run without Ray in unit tests.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mlray.models import Classifier, ModelSpec, build

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs; travels to workers as a plain dict (``train_loop_config``)."""

    model: dict[str, Any]
    mean: list[float]
    std: list[float]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    tracking_uri: str | None = None
    run_id: str | None = None
    precision: str = "fp32"
    cpus_per_worker: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochStats:
    """Sums over one pass; added up across workers before they become metrics."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def all_reduce(self) -> EpochStats:
        if not (dist.is_available() and dist.is_initialized()):
            return self
        packed = torch.tensor([self.loss_sum, float(self.correct), float(self.count)], dtype=torch.float64)
        dist.all_reduce(packed)
        return EpochStats(float(packed[0]), int(packed[1]), int(packed[2]))

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


def unwrap(model: nn.Module) -> Classifier:
    inner = getattr(model, "module", model)  # DDP keeps the model in .module
    assert isinstance(inner, Classifier)
    return inner


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for the forward pass: bf16 or fp16 autocast on the device; fp32 does nothing."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not (disabled)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *, precision: str = "fp32", scaler: torch.amp.GradScaler | None = None,
) -> EpochStats:
    """One pass over the worker's shard. Gradients are averaged across workers by DDP in backward().

    Runs without Ray: the same function is the step on one CPU, in DDP workers, and on a GPU.
    """
    model.train()
    stats = EpochStats()
    loss_fn = nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    scaler = scaler or grad_scaler(device, precision)
    for x, y in batches:  # x: (B, F) float32, y: (B,) int64
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(x)  # (B, K)
            loss = loss_fn(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        stats.loss_sum += float(loss.detach()) * len(y)
        stats.correct += int((logits.argmax(dim=1) == y).sum())
        stats.count += len(y)
    return stats


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, num_classes: int | None = None
) -> tuple[EpochStats, torch.Tensor | None]:
    """Loss and accuracy over a shard, and a (K, K) confusion matrix (rows: truth) when asked."""
    net = unwrap(model)  # evaluation needs no gradient sync, so skip DDP's wrapper
    net.eval()
    stats = EpochStats()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64) if num_classes else None
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for x, y in batches:
        logits = net(x)
        pred = logits.argmax(dim=1)
        stats.loss_sum += float(loss_fn(logits, y))
        stats.correct += int((pred == y).sum())
        stats.count += len(y)
        if confusion is not None:
            assert num_classes is not None  # confusion exists only when num_classes was given
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(
                num_classes, num_classes
            ).cpu()
    return stats, confusion


def new_training_state(cfg: LoopConfig) -> tuple[Classifier, torch.optim.Optimizer, Any]:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank, and on every rerun
    model = build(ModelSpec.from_dict(cfg.model))
    model.standardize.fit(cfg.mean, cfg.std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return model, optimizer, scheduler


def save_state(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
    history: list[dict[str, float]], scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Everything needed to continue exactly after ``epoch``: weights, optimizer, schedule, RNG, history."""
    torch.save(
        {
            "model": unwrap(model).state_dict(),
            "model_spec": unwrap(model).spec.to_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "history": history,
            "torch_rng": torch.get_rng_state(),
            "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        },
        folder / STATE_FILE,
    )


def load_state(folder: Path) -> dict[str, Any]:
    # weights_only: a checkpoint holds tensors and plain containers; nothing in it may run code on load.
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


FETCH_ROWS = 4096  # rows pulled from Ray Data at a time, then cut into minibatches in torch


def _batches(shard: Any, *, batch_size: int, device: torch.device, shuffle_seed: int | None = None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches from a Ray Data shard.

    Ray Data's per-batch cost is fixed, so rows are fetched in large blocks and cut into minibatches with
    tensor slicing.
    With a seed, rows are shuffled per epoch: Ray Data's local shuffle buffer, then a seeded permutation
    within each block. Every rank gets the same number of minibatches, as DDP needs: the shards are
    equal-sized and blocks are cut the same way.
    """
    fetch = max(batch_size, FETCH_ROWS // batch_size * batch_size)
    shuffle: dict[str, Any] = {}
    generator = None
    if shuffle_seed is not None:
        shuffle = {"local_shuffle_buffer_size": fetch * 2, "local_shuffle_seed": shuffle_seed}
        generator = torch.Generator().manual_seed(shuffle_seed)
    for block in shard.iter_torch_batches(
        batch_size=fetch, dtypes={"x": torch.float32, "y": torch.int64}, device=device, **shuffle
    ):
        x, y = block["x"], block["y"]  # (fetch, F), (fetch,)
        if generator is not None:
            order = torch.randperm(len(y), generator=generator).to(y.device)
            x, y = x[order], y[order]
        for start in range(0, len(y), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]


def _gather_node_ids() -> list[str]:
    """The Ray node id of every rank, in rank order (where the workers ran)."""
    import ray

    mine = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return [str(node) for node in every]


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point; returns the test metrics and confusion matrix (rank 0's value is kept)."""
    import ray.train
    import ray.train.torch

    from mlray.monitoring import EpochGauges
    from mlray.tracking import EpochLogger

    cfg = LoopConfig(**config)
    # One intra-op thread per CPU the worker was given: more threads than cores oversubscribes the node.
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    model: nn.Module  # a Classifier, then DDP-wrapped by prepare_model below
    model, optimizer, scheduler = new_training_state(cfg)
    scaler = grad_scaler(device, cfg.precision)
    start_epoch, history = 0, []

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(Path(folder))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])
        logger.info("Rank %d resuming from the checkpoint of epoch %d", rank, state["epoch"])

    model = ray.train.torch.prepare_model(model)
    epoch_logger = EpochLogger(cfg.tracking_uri, cfg.run_id) if rank == 0 and cfg.run_id else None
    gauges = EpochGauges(cfg.run_id) if rank == 0 and cfg.run_id else None
    if epoch_logger is not None:
        epoch_logger.record_attempt(start_epoch)
        epoch_logger.sync(history)  # fill in epochs a failed attempt checkpointed but did not log

    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val", "test")}
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        train_stats = train_epoch(
            model, optimizer, _batches(shards["train"], batch_size=cfg.batch_size, device=device,
                                       shuffle_seed=cfg.seed * 1000 + epoch),
            precision=cfg.precision, scaler=scaler,
        ).all_reduce()
        train_seconds = time.perf_counter() - started  # the training pass, data loading included
        val_stats, _ = evaluate(model, _batches(shards["val"], batch_size=1024, device=device))
        val_stats = val_stats.all_reduce()
        metrics = {
            "epoch": epoch,
            "train_loss": train_stats.loss,
            "train_accuracy": train_stats.accuracy,
            "val_loss": val_stats.loss,
            "val_accuracy": val_stats.accuracy,
            "lr": scheduler.get_last_lr()[0],
            "epoch_seconds": train_seconds,
            "samples_per_second": train_stats.count / max(train_seconds, 1e-9),
        }
        scheduler.step()
        history.append(metrics)
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                save_state(Path(folder), model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                           history=history, scaler=scaler)
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved)
        if epoch_logger is not None:
            # After the checkpoint is stored, and only for epochs the run does not have yet: an epoch
            # re-run after a failure keeps the value its first run logged (one value per epoch).
            epoch_logger.log_epoch(metrics)
        if gauges is not None:
            gauges.set(metrics)

    num_classes = ModelSpec.from_dict(cfg.model).num_classes
    test_stats, confusion = evaluate(model, _batches(shards["test"], batch_size=1024, device=device),
                                     num_classes=num_classes)
    test_stats = test_stats.all_reduce()
    assert confusion is not None
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
    return {
        "worker_nodes": _gather_node_ids(),
        "test_loss": test_stats.loss,
        "test_accuracy": test_stats.accuracy,
        "test_count": test_stats.count,
        "confusion": confusion.tolist(),
        "history": history,
    }
