"""The training loop's collectives run on the worker's device (NCCL reduces CUDA tensors only).

A CPU-only machine cannot run NCCL, so the test builds the same failure out of two real pieces: a gloo
process group (world size 1) behind a wrapper that, like NCCL, refuses any tensor that is not on the
workers' device; and a default device (``meta``) that differs from the workers' device (``cpu``), so a
tensor created without naming the device lands somewhere else, exactly as a CPU tensor does next to a
CUDA model. The model and the data are put on the device explicitly, as Ray Train does on a GPU worker.
The pre-fix loop (tensors created without a device) fails this test; see the note in the issue/report.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mlray.models import ModelSpec
from mlray.training.loop import LoopConfig, epoch_pass, evaluate_test_split, new_training_state
from tests.helpers import free_port

DEVICE = torch.device("cpu")  # the workers' device; the default device below is another one


@pytest.fixture
def group() -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def device_only(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """Every collective the loop makes goes through here; a tensor off DEVICE is refused, as NCCL refuses a
    CPU tensor. Returns the devices seen, so the test knows collectives really ran."""
    seen: list[torch.device] = []
    real_all_reduce = dist.all_reduce

    def all_reduce(tensor: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(tensor.device)
        if tensor.device != DEVICE:
            raise RuntimeError(f"this process group reduces tensors on {DEVICE} only, got one on {tensor.device}")
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return seen


def _setup(task: str):
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(96, 6)), dtype=torch.float32, device=DEVICE)
    if task == "classification":
        y = torch.tensor(rng.integers(0, 3, 96), device=DEVICE)
        spec = ModelSpec(factory="mlray.models:mlp", num_features=6, num_outputs=3, kwargs={"hidden": [8]})
    else:
        y = torch.tensor(rng.normal(size=96) * 5 + 20, dtype=torch.float32, device=DEVICE)
        spec = ModelSpec(factory="mlray.models:mlp", num_features=6, num_outputs=1, kwargs={"hidden": [8]},
                         task="regression")
    cfg = LoopConfig(model=spec.to_dict(), mean=[0.0] * 6, std=[1.0] * 6, epochs=2, batch_size=32, lr=0.01,
                     weight_decay=0.0, seed=0, loss="cross_entropy" if task == "classification" else "mse",
                     target_mean=[20.0], target_std=[5.0])
    model, _, _ = new_training_state(cfg)
    model.to(DEVICE)
    # SGD without momentum keeps no state: the optimizer makes no tensors of its own under the default device.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    return cfg, model, optimizer, batches


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_every_collective_of_the_loop_runs_on_the_workers_device(group, device_only, task):
    cfg, model, optimizer, batches = _setup(task)
    with torch.device("meta"):  # the default device is not the workers' device
        metrics, rows, _ = epoch_pass(model, optimizer, batches, batches, task=task, loss=cfg.loss)
        tested = evaluate_test_split(model, batches, task=task, loss=cfg.loss,
                                     num_classes=3 if task == "classification" else None)
    assert device_only and set(device_only) == {DEVICE}
    assert len(device_only) == (4 if task == "classification" else 3)  # train, val, test sums (+ confusion)
    assert rows == 96 and tested["test_count"] == 96
    if task == "classification":
        assert 0 <= metrics["val_accuracy"] <= 1
        assert np.asarray(tested["confusion"]).sum() == 96
    else:
        assert metrics["val_rmse"] > 0 and np.isfinite(tested["test_r2"])
