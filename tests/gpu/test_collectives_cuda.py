"""The training loop's step and collectives on CUDA through a real NCCL group (world size 1 is enough: NCCL
refuses CPU tensors whatever the world size). No Ray needed: runs on any machine with one GPU."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mlray.models import ModelSpec
from mlray.training.loop import LoopConfig, epoch_pass, evaluate_test_split, new_training_state
from tests.helpers import free_port


@pytest.fixture
def nccl() -> Iterator[None]:
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_loop_collectives_on_nccl(nccl, task, precision):
    device = torch.device("cuda", 0)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(512, 8)), dtype=torch.float32, device=device)
    k = 3 if task == "classification" else 1
    if task == "classification":
        y = torch.tensor(rng.integers(0, 3, 512), device=device)
        x = x + y[:, None].float() * 2  # learnable
    else:
        y = (x @ torch.arange(1, 9, device=device, dtype=torch.float32)) * 3 + 50
    spec = ModelSpec(factory="mlray.models:mlp", num_features=8, num_outputs=k, kwargs={"hidden": [32]}, task=task)
    cfg = LoopConfig(model=spec.to_dict(), mean=[0.0] * 8, std=[1.0] * 8, epochs=1, batch_size=64, lr=0.01,
                     weight_decay=0.0, seed=0, precision=precision,
                     loss="cross_entropy" if task == "classification" else "mse",
                     target_mean=[float(y.float().mean())], target_std=[float(y.float().std())])
    model, optimizer, _ = new_training_state(cfg)
    model.to(device)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    for _ in range(20):
        metrics, rows, _ = epoch_pass(model, optimizer, batches, batches, task=task, loss=cfg.loss,
                                      precision=precision)
    tested = evaluate_test_split(model, batches, task=task, loss=cfg.loss, num_classes=3 if k == 3 else None)
    assert rows == 512 and tested["test_count"] == (512 if task == "classification" else 512)
    if task == "classification":
        assert metrics["val_accuracy"] > 0.8 and np.asarray(tested["confusion"]).sum() == 512
    else:
        assert tested["test_r2"] > 0.8


def test_loader_puts_the_model_on_cuda(tmp_path):
    from mlray.artifact import load_model_dir, write_model_dir
    from mlray.models import build

    model = build(ModelSpec(factory="mlray.models:mlp", num_features=4, num_outputs=2, kwargs={"hidden": [8]}))
    write_model_dir(tmp_path, model=model, feature_names=list("abcd"), class_names=["0", "1"])
    loaded = load_model_dir(tmp_path)
    assert loaded.device.type == "cuda" and next(loaded.model.parameters()).is_cuda
    on_cpu = load_model_dir(tmp_path, device="cpu")
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x), on_cpu.predict(x), atol=1e-5)
