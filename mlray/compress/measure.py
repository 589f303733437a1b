"""The figures of a variant and of its parent: task metric, size and CPU latency, measured the same way.

The metric comes from :func:`mlray.training.loop.evaluate_test_split`, the code that evaluates training, over the
parent's held-out test split. Latency goes through :meth:`mlray.artifact.LoadedModel.predict` (what a
Serve replica calls, with one intra-op thread as a replica has): the median of repeated timed calls after
warm-up, at batch 1 and batch 64.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlray.artifact import WEIGHTS_FILE, LoadedModel
from mlray.compress.variants import ONNX_FILE
from mlray.training.loop import evaluate_test_split

LATENCY_BATCHES = (1, 64)
WARMUP_CALLS = 20
TIMED_CALLS = {1: 300, 64: 100}  # per batch size; the median of these is the figure
EVAL_BATCH = 1024  # as training's test pass


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, F) float32
    y: np.ndarray  # (N,) int64 classes or float32 targets


def task_metric(task: str) -> str:
    """The metric the tolerance applies to: accuracy for classification, RMSE for regression."""
    return "test_accuracy" if task == "classification" else "test_rmse"


def metric_loss_points(task: str, parent: float, variant: float) -> float:
    """How much worse the variant is, in points: accuracy points lost (percentage points) for classification,
    percent of the parent's RMSE gained for regression. Negative when the variant is better."""
    if task == "classification":
        return 100.0 * (parent - variant)
    return 100.0 * (variant - parent) / max(parent, 1e-12)


def _batches(split: Split, task: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    label_dtype = torch.int64 if task == "classification" else torch.float32
    for start in range(0, len(split.y), EVAL_BATCH):
        yield (torch.from_numpy(np.ascontiguousarray(split.x[start : start + EVAL_BATCH], dtype=np.float32)),
               torch.as_tensor(split.y[start : start + EVAL_BATCH], dtype=label_dtype))


def test_metrics(loaded: LoadedModel, test: Split, *, loss: str = "cross_entropy") -> dict[str, float]:
    """The test_* metrics of training's own evaluation, for this model."""
    task = loaded.task
    num_classes = loaded.num_outputs if task == "classification" else None
    out = evaluate_test_split(loaded.model, _batches(test, task), task=task, loss=loss, num_classes=num_classes)
    return {key: float(value) for key, value in out.items() if key.startswith("test_") and key != "test_count"}


def latency_ms(models: list[LoadedModel], rows: np.ndarray) -> list[dict[int, float]]:
    """Median milliseconds of ``predict`` at each batch size in :data:`LATENCY_BATCHES`, for each model.

    One intra-op thread, as a replica runs. The models' timed calls alternate (one call each, in turn), so
    a change in the machine's load while measuring (other processes on a shared host) falls on all alike.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Serve replica runs (mlray/serving/app.py); onnxruntime's session uses one too
    try:
        return _alternating(models, rows)
    finally:
        torch.set_num_threads(threads)


def _alternating(models: list[LoadedModel], rows: np.ndarray) -> list[dict[int, float]]:
    figures: list[dict[int, float]] = [{} for _ in models]
    for size in LATENCY_BATCHES:
        batch = np.ascontiguousarray(np.resize(rows, (size, rows.shape[1])), dtype=np.float32)
        for loaded in models:
            for _ in range(WARMUP_CALLS):
                loaded.predict(batch)
        times: list[list[float]] = [[] for _ in models]
        for _ in range(TIMED_CALLS[size]):
            for index, loaded in enumerate(models):
                started = time.perf_counter()
                loaded.predict(batch)
                times[index].append(time.perf_counter() - started)
        for index, seconds in enumerate(times):
            figures[index][size] = 1000.0 * statistics.median(seconds)
    return figures


def size_bytes(folder: Path) -> int:
    """Bytes of the model's weights as stored: the safetensors file and, for ONNX, the graph."""
    return sum((folder / name).stat().st_size for name in (WEIGHTS_FILE, ONNX_FILE) if (folder / name).is_file())


def figures(models: list[tuple[LoadedModel, Path]], test: Split, *, loss: str = "cross_entropy"
            ) -> list[dict[str, float]]:
    """Metrics, size and latency of each (model, folder), with plain names; latency measured side by side."""
    out = []
    for loaded, folder in models:
        found = test_metrics(loaded, test, loss=loss)
        found["size_bytes"] = float(size_bytes(folder))
        out.append(found)
    for found, latency in zip(out, latency_ms([loaded for loaded, _ in models], test.x), strict=True):
        found.update({f"latency_ms_b{size}": ms for size, ms in latency.items()})
    return out
