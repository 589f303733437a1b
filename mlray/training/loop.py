"""The worker side of training: one epoch, evaluation, checkpoint save and restore.

``train_loop_per_worker`` runs on every Ray Train worker. It starts by asking "is there a checkpoint to
resume from?" and ends every epoch with a report, so a restart after a failure takes the normal path.
The step functions below take plain iterables of ``(x, y)`` tensors and run without Ray in unit tests.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mlray.models import ModelSpec, StandardizedModel, build

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
    loss: str = "cross_entropy"
    target_mean: list[float] | None = None  # regression: the training split's target statistics
    target_std: list[float] | None = None
    code_root: str | None = None  # where the driver imported model.factory from; appended to sys.path

    @property
    def task(self) -> str:
        return str(self.model.get("task", "classification"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochStats:
    """Sums over one pass; added up across workers before they become metrics.

    Classification counts correct rows; regression sums squared and absolute errors and the targets' first
    two moments (for R^2), over every target value.
    """

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    sq_err: float = 0.0
    abs_err: float = 0.0
    y_sum: float = 0.0
    y_sq: float = 0.0

    def all_reduce(self, device: torch.device | None = None) -> EpochStats:
        """Sums over every rank. ``device`` is the worker's: NCCL reduces CUDA tensors only (the process group
        Ray Train builds for GPUs has no CPU backend), so the sums travel on the device the model is on."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        packed = torch.tensor([self.loss_sum, float(self.correct), float(self.count), self.sq_err, self.abs_err,
                               self.y_sum, self.y_sq], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        values = packed.tolist()
        return EpochStats(values[0], int(values[1]), int(values[2]), *values[3:])

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)

    def metrics(self, task: str) -> dict[str, float]:
        """The split's metrics by name (to be prefixed train_/val_/test_)."""
        if task == "classification":
            return {"loss": self.loss, "accuracy": self.accuracy}
        n = max(self.count, 1)
        total = self.y_sq - self.y_sum * self.y_sum / n  # sum of squares around the mean
        return {"loss": self.loss, "rmse": math.sqrt(self.sq_err / n), "mae": self.abs_err / n,
                "r2": 1.0 - self.sq_err / total if total > 0 else 0.0}

    def add(self, loss_sum: float, out: torch.Tensor, y: torch.Tensor, task: str) -> None:
        """One batch: ``out`` (B, K) logits or values, ``y`` (B,) classes or targets."""
        self.loss_sum += loss_sum
        if task == "classification":
            self.correct += int((out.argmax(dim=1) == y).sum())
            self.count += len(y)
            return
        pred, target = out.detach().float(), y.view(len(y), -1).float()  # (B, T)
        err = pred - target
        self.sq_err += float((err * err).sum())
        self.abs_err += float(err.abs().sum())
        self.y_sum += float(target.sum())
        self.y_sq += float((target * target).sum())
        self.count += target.numel()


def unwrap(model: nn.Module) -> StandardizedModel:
    inner = getattr(model, "module", model)  # DDP keeps the model in .module
    assert isinstance(inner, StandardizedModel)
    return inner


_LOSSES = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss, "l1": nn.L1Loss, "huber": nn.HuberLoss}


def batch_loss(model: nn.Module, out: torch.Tensor, y: torch.Tensor, *, task: str, loss: str,
               reduction: str = "mean") -> torch.Tensor:
    """The training objective. Regression compares in standardised target units, so that the loss (and
    Huber's delta) mean the same on any target scale; metrics stay in the target's own units."""
    loss_fn = _LOSSES[loss](reduction=reduction)
    if task == "classification":
        return loss_fn(out.float(), y)  # (B, K) logits, (B,) classes
    scale = unwrap(model).target
    assert scale is not None  # a regression model has target statistics
    target = y.view(len(y), -1).float()  # (B,) -> (B, T)
    return loss_fn((out.float() - scale.mean) / scale.std, (target - scale.mean) / scale.std)


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
    *, precision: str = "fp32", scaler: torch.amp.GradScaler | None = None, task: str = "classification",
    loss: str = "cross_entropy",
) -> EpochStats:
    """One pass over the worker's shard. Gradients are averaged across workers by DDP in backward().

    Runs without Ray: the same function is the step on one CPU, in DDP workers, and on a GPU.
    """
    model.train()
    stats = EpochStats()
    device = next(model.parameters()).device
    scaler = scaler or grad_scaler(device, precision)
    for x, y in batches:  # x: (B, F) float32, y: (B,) int64 classes or float32 targets
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = model(x)  # (B, K)
            value = batch_loss(model, out, y, task=task, loss=loss)
        scaler.scale(value).backward()
        scaler.step(optimizer)
        scaler.update()
        stats.add(float(value.detach()) * len(y), out, y, task)
    return stats


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, num_classes: int | None = None,
    task: str = "classification", loss: str = "cross_entropy",
) -> tuple[EpochStats, torch.Tensor | None]:
    """Loss and metrics over a shard, and a (K, K) confusion matrix (rows: truth) when asked.

    The confusion matrix stays on the batches' device, so it can be all-reduced there.
    """
    net = unwrap(model)  # evaluation needs no gradient sync, so skip DDP's wrapper
    net.eval()
    stats = EpochStats()
    confusion = None
    for x, y in batches:
        out = net(x)
        stats.add(float(batch_loss(net, out, y, task=task, loss=loss, reduction="sum")), out, y, task)
        if num_classes and task == "classification":
            counts = torch.bincount(y * num_classes + out.argmax(dim=1), minlength=num_classes**2)
            confusion = counts.view(num_classes, num_classes) + (0 if confusion is None else confusion)
    if num_classes and task == "classification" and confusion is None:
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=_device_of(net))
    return stats, confusion


def _device_of(model: nn.Module) -> torch.device:
    # A compressed variant (int8, ONNX) may have no parameters left; its standardisation buffers remain.
    return next(itertools.chain(model.parameters(), model.buffers())).device


def epoch_pass(
    model: nn.Module, optimizer: torch.optim.Optimizer, train_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, task: str, loss: str, precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[dict[str, float], int, float]:
    """Train on the shard, evaluate on validation, sum both over every rank (on the model's device).

    Returns the metrics (train_*, val_*), the rows trained on by all ranks and the training pass's seconds.
    """
    device = _device_of(model)
    started = time.perf_counter()
    train_stats = train_epoch(model, optimizer, train_batches, precision=precision, scaler=scaler, task=task,
                              loss=loss).all_reduce(device)
    seconds = time.perf_counter() - started  # the training pass, data loading included
    val_stats, _ = evaluate(model, val_batches, task=task, loss=loss)
    val_stats = val_stats.all_reduce(device)
    metrics = {f"train_{k}": v for k, v in train_stats.metrics(task).items() if k in ("loss", "accuracy", "rmse")}
    metrics.update({f"val_{k}": v for k, v in val_stats.metrics(task).items()})
    per_row = 1 if task == "classification" else unwrap(model).spec.num_outputs  # regression counts values
    rows = train_stats.count // max(1, per_row)
    return metrics, rows, seconds


def evaluate_test_split(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, task: str,
                        loss: str, num_classes: int | None) -> dict[str, Any]:
    """Test metrics summed over every rank, and for classification the (K, K) confusion matrix as lists."""
    device = _device_of(model)
    stats, confusion = evaluate(model, batches, num_classes=num_classes, task=task, loss=loss)
    stats = stats.all_reduce(device)
    out: dict[str, Any] = {f"test_{k}": v for k, v in stats.metrics(task).items()}
    out["test_count"] = stats.count
    if confusion is not None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(confusion)  # on the model's device, as NCCL needs
        out["confusion"] = confusion.cpu().tolist()
    return out


def new_training_state(cfg: LoopConfig) -> tuple[StandardizedModel, torch.optim.Optimizer, Any]:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank, and on every rerun
    model = build(ModelSpec.from_dict(cfg.model))
    model.standardize.fit(cfg.mean, cfg.std)
    if model.target is not None:
        assert cfg.target_mean is not None and cfg.target_std is not None  # set by the driver for regression
        model.target.fit(cfg.target_mean, cfg.target_std)
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


def _batches(shard: Any, *, batch_size: int, device: torch.device, shuffle_seed: int | None = None,
             label_dtype: torch.dtype = torch.int64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        batch_size=fetch, dtypes={"x": torch.float32, "y": label_dtype}, device=device, **shuffle
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

    from mlray.cluster.monitoring import EpochGauges
    from mlray.registry.tracking import EpochLogger

    cfg = LoopConfig(**config)
    if cfg.code_root and cfg.code_root not in sys.path and Path(cfg.code_root).is_dir():
        # The driver's copy of model.factory's package, for a worker on the same machine that did not get it
        # from the job's working_dir or an installed package (appended: those come first).
        sys.path.append(cfg.code_root)
    # One intra-op thread per CPU the worker was given: more threads than cores oversubscribes the node.
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    # First: every rank must ask for its shards before any gets them, and the first ask starts Ray Data's
    # split coordinators (one process each, ~3 s on 2 cores). Asked here, they start while the workers build
    # the model and rank 0 opens its MLflow logger, instead of after (bench/README.md, train_startup section).
    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val", "test")}
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    model: nn.Module  # a StandardizedModel, then DDP-wrapped by prepare_model below
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

    model = ray.train.torch.prepare_model(model)  # moves it to `device`, then DDP
    epoch_logger = EpochLogger(cfg.tracking_uri, cfg.run_id) if rank == 0 and cfg.run_id else None
    gauges = EpochGauges(cfg.run_id) if rank == 0 and cfg.run_id else None
    if epoch_logger is not None:
        epoch_logger.record_attempt(start_epoch)
        epoch_logger.sync(history)  # fill in epochs a failed attempt checkpointed but did not log

    task, label_dtype = cfg.task, torch.int64 if cfg.task == "classification" else torch.float32
    for epoch in range(start_epoch, cfg.epochs):
        train_batches = _batches(shards["train"], batch_size=cfg.batch_size, device=device,
                                 shuffle_seed=cfg.seed * 1000 + epoch, label_dtype=label_dtype)
        val_batches = _batches(shards["val"], batch_size=1024, device=device, label_dtype=label_dtype)
        measured, rows, train_seconds = epoch_pass(model, optimizer, train_batches, val_batches, task=task,
                                                   loss=cfg.loss, precision=cfg.precision, scaler=scaler)
        metrics = {
            "epoch": epoch,
            **measured,
            "lr": scheduler.get_last_lr()[0],
            "epoch_seconds": train_seconds,
            "samples_per_second": rows / max(train_seconds, 1e-9),
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

    spec = ModelSpec.from_dict(cfg.model)
    tested = evaluate_test_split(
        model, _batches(shards["test"], batch_size=1024, device=device, label_dtype=label_dtype), task=task,
        loss=cfg.loss, num_classes=spec.num_outputs if task == "classification" else None)
    return {"worker_nodes": _gather_node_ids(), **tested, "history": history}
