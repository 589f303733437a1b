"""Training and serving on GPUs through Ray: 2-worker DDP over NCCL (digits with the built-in MLP, and a user
factory), bf16 and fp16, a resume after a worker is killed, and a Serve replica given a GPU.

Skipped without CUDA (tests/gpu/conftest.py); the DDP tests need two GPUs (NCCL needs one GPU per rank).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from mlray.config import parse_config
from tests.conftest import deploy_app

USERPROJECT = Path(__file__).resolve().parents[1] / "fixtures" / "userproject"
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="2-worker NCCL DDP needs two GPUs")


@pytest.fixture
def userproject():
    sys.path.append(str(USERPROJECT))
    yield
    sys.path.remove(str(USERPROJECT))


def _gpu_config(name: str, *, precision: str = "fp32", model: dict | None = None, **train):
    return parse_config({"name": name, "model": model or {"arch": "mlp"},
                         "train": {"num_workers": 2, "use_gpu": True, "epochs": 8, "precision": precision, **train}})


@two_gpus
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ddp_on_two_gpus_digits(ray_session, precision):
    from mlray.training.train import train

    result = train(_gpu_config(f"gpu-digits-{precision}", precision=precision))
    assert result.test_accuracy >= 0.9 and len(result.worker_nodes) == 2


@two_gpus
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ddp_on_two_gpus_user_factory(ray_session, userproject, precision):
    from mlray.training.train import train

    model = {"factory": "usermodel.nets:residual_mlp", "kwargs": {"width": 64, "depth": 2}}
    result = train(_gpu_config(f"gpu-user-{precision}", precision=precision, model=model))
    assert result.test_accuracy >= 0.9


@two_gpus
def test_resume_on_gpus_after_a_worker_dies(ray_session, userproject, tmp_path):
    from mlray.registry.tracking import ATTEMPTS_TAG, client
    from mlray.training.train import train

    model = {"factory": "usermodel.nets:exits_once", "kwargs": {"marker": str(tmp_path / "died"), "after": 60}}
    result = train(_gpu_config("gpu-resume", model=model, max_failures=2))
    attempts = json.loads(client().get_run(result.run_id).data.tags[ATTEMPTS_TAG])
    assert (tmp_path / "died").exists() and len(attempts) == 2 and attempts[1] > 0, attempts
    assert result.test_accuracy >= 0.85


def test_a_served_replica_with_a_gpu_runs_the_model_on_cuda(trained, serve_port):
    from mlray.registry import promote
    from mlray.serving.loader import load_registered
    from mlray.training.data import sample_test_rows

    promote("digits", version=trained.version, alias="champion", force=True)
    url = deploy_app("digitsgpu", {"model": "digits", "alias": "champion"}, port=serve_port,
                     options={"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1}})
    meta = requests.get(f"{url}/v1/models/digits", timeout=30).json()
    assert meta["device"].startswith("cuda"), meta
    x, _ = sample_test_rows(parse_config({}).data, seed=42, count=16)
    answer = requests.post(f"{url}/v1/models/digits:predict", json={"instances": x.tolist()}, timeout=30).json()
    offline = load_registered("digits", alias="champion").loaded
    np.testing.assert_allclose(answer["predictions"], offline.predict(x), atol=1e-4)
    from ray import serve

    serve.delete("digitsgpu")
