"""The figures of a variant and of its parent: task metric, size and CPU latency, measured the same way.

The metric comes from :func:`mlray.loop.evaluate_test_split`, the code that evaluates training, over the
parent's held-out test split. Latency goes through :meth:`mlray.artifact.LoadedModel.predict` (what a
Serve replica calls): the median of repeated timed calls after warm-up, at batch 1 and batch 64.
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
from mlray.loop import evaluate_test_split

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


def latency_ms(loaded: LoadedModel, rows: np.ndarray) -> dict[int, float]:
    """Median milliseconds of ``loaded.predict`` at each batch size in :data:`LATENCY_BATCHES`."""
    figures = {}
    for size in LATENCY_BATCHES:
        batch = np.ascontiguousarray(np.resize(rows, (size, rows.shape[1])), dtype=np.float32)
        for _ in range(WARMUP_CALLS):
            loaded.predict(batch)
        times = []
        for _ in range(TIMED_CALLS[size]):
            started = time.perf_counter()
            loaded.predict(batch)
            times.append(time.perf_counter() - started)
        figures[size] = 1000.0 * statistics.median(times)
    return figures


def size_bytes(folder: Path) -> int:
    """Bytes of the model's weights as stored: the safetensors file and, for ONNX, the graph."""
    return sum((folder / name).stat().st_size for name in (WEIGHTS_FILE, ONNX_FILE) if (folder / name).is_file())


def figures(loaded: LoadedModel, folder: Path, test: Split, *, loss: str = "cross_entropy"
            ) -> dict[str, float]:
    """Metrics, size and latency of one model, with plain names (the caller prefixes the parent's)."""
    out = test_metrics(loaded, test, loss=loss)
    out["size_bytes"] = float(size_bytes(folder))
    for size, ms in latency_ms(loaded, test.x).items():
        out[f"latency_ms_b{size}"] = ms
    return out
