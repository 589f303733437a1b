"""Training that survives: real kills on a real local Ray cluster (issue "Training that survives and scales").

Each test trains the same digits config as the undisturbed baseline (``trained``, same seed) under a
different model name, breaks something mid-training, and checks that training finished, that it resumed
from the last checkpoint (not from scratch), that MLflow holds exactly one run with exactly one value per
epoch per metric, exactly one registered version, and an accuracy within 1 point of the baseline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml

from mlray.errors import TrainingFailed
from mlray.registry.tracking import ATTEMPTS_TAG, EPOCH_METRICS, client
from mlray.training.train import RUN_NAME_TAG
from tests.conftest import DIGITS, digits_config
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = DIGITS["train"]["epochs"]


def _runs(experiment: str):
    found = client().get_experiment_by_name(experiment)
    return [] if found is None else client().search_runs([found.experiment_id])


def _epochs_logged(experiment: str) -> int:
    runs = _runs(experiment)
    if not runs:
        return 0
    return len(client().get_metric_history(runs[0].info.run_id, "train_loss"))


def _train_in_background(cfg) -> Future:
    from mlray.training.train import train

    pool = ThreadPoolExecutor(1)
    future = pool.submit(train, cfg)
    pool.shutdown(wait=False)
    return future


def _train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmdline:
            found.append(proc)
    return found


def assert_survived(name: str, baseline, result=None) -> list[int]:
    """The shared acceptance checks; returns the attempts' first epochs."""
    runs = _runs(name)
    assert len(runs) == 1, f"expected one MLflow run, got {[r.info.run_id for r in runs]}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        steps = [m.step for m in client().get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(EPOCHS)), f"{key}: exactly one value per epoch, got {sorted(steps)}"
    versions = client().search_model_versions(f"name='{name}'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    accuracy = run.data.metrics["test_accuracy"]
    assert abs(accuracy - baseline.test_accuracy) <= 0.01, (accuracy, baseline.test_accuracy)
    attempts = json.loads(run.data.tags[ATTEMPTS_TAG])
    assert len(attempts) >= 2 and attempts[0] == 0, attempts
    # The kill came after epoch 2 was logged; the newest checkpoint the controller had registered then
    # is epoch 1 or 2, so the last attempt starts at 2 or 3, never at 0.
    assert attempts[-1] >= 2, f"the last attempt started at epoch {attempts[-1]}: it did not resume from a checkpoint"
    return attempts


def test_a_worker_sigkilled_mid_epoch(trained):
    name = "digits-workerkill"
    future = _train_in_background(digits_config(name=name, train={"max_failures": 3}))
    wait_for(lambda: _epochs_logged(name) >= 3, timeout=240, interval=0.05, what="3 epochs logged")
    victims = _train_workers()
    assert len(victims) == 2
    victims[-1].send_signal(signal.SIGKILL)  # mid-epoch 4: the next epoch starts right after the log
    result = future.result(timeout=600)
    assert_survived(name, trained, result)


def test_b_worker_node_removed_and_replaced(ray_cluster, trained):
    """Workers run only on two extra nodes (a custom resource); one node is removed mid-training and a
    replacement is added, as an autoscaler would."""
    name = "digits-nodeloss"
    nodes = [ray_cluster.add_node(num_cpus=1, resources={"trainer_slot": 1}) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    try:
        future = _train_in_background(digits_config(name=name, train={
            "max_failures": 3, "resources_per_worker": {"CPU": 1, "trainer_slot": 1},
        }))
        wait_for(lambda: _epochs_logged(name) >= 3, timeout=240, interval=0.05, what="3 epochs logged")
        ray_cluster.remove_node(nodes.pop(0))
        nodes.append(ray_cluster.add_node(num_cpus=1, resources={"trainer_slot": 1}))
        result = future.result(timeout=600)
        assert_survived(name, trained, result)
        live = {n.node_id for n in nodes}
        assert set(result.worker_nodes) == live, "the final attempt ran on the surviving and the new node"
    finally:
        for node in nodes:
            ray_cluster.remove_node(node)


@pytest.mark.slow
def test_c_driver_sigkilled_then_rerun_continues(ray_cluster, trained, tmp_path):
    name, run_name = "digits-driverkill", "driverkill-1"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({**DIGITS, "name": name, "train": {**DIGITS["train"], "max_failures": 3}}))
    command = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(config), "--run-name", run_name]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}

    first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _epochs_logged(name) >= 3, timeout=240, interval=0.05, what="3 epochs logged")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # the killed driver's training actors go with it; wait until they are gone before the re-run
    wait_for(lambda: not _train_workers(), timeout=60, what="the killed driver's workers gone")
    assert _runs(name)[0].info.status == "RUNNING"

    second = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_survived(name, trained)
    assert _runs(name)[0].data.tags[RUN_NAME_TAG] == run_name
    assert json.loads(second.stdout.strip().splitlines()[-1])["version"] == 1


def test_d_failure_on_every_attempt_ends_failed_and_registers_nothing(ray_session):
    """A model that fails in every training step (it passes the driver's one-batch check in eval mode) makes
    every attempt fail; after max_failures restarts the run ends FAILED. (Bad labels no longer get this far:
    they are refused before any worker starts, tests/integration/test_own_model.py.)"""
    from mlray.config import parse_config
    from mlray.training.train import train

    userproject = Path(__file__).resolve().parents[1] / "fixtures" / "userproject"
    sys.path.append(str(userproject))  # the driver imports the factory; workers get the same folder from it
    try:
        cfg = parse_config({"name": "badlabels", "model": {"factory": "usermodel.nets:fails_in_training"},
                            "train": {"num_workers": 2, "epochs": 2, "max_failures": 1}})
        expected = r"training of 'badlabels' failed in run \w+: RuntimeError: usermodel fails in training on purpose"
        with pytest.raises(TrainingFailed, match=expected):
            train(cfg)
    finally:
        sys.path.remove(str(userproject))
    runs = _runs("badlabels")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["mlray.failure"] == "RuntimeError: usermodel fails in training on purpose"
    assert len(json.loads(runs[0].data.tags[ATTEMPTS_TAG])) == 2  # the first try and one restart
    assert client().search_model_versions("name='badlabels'") == []


def test_spread_puts_workers_on_three_nodes(ray_cluster):
    from mlray.training.train import train

    nodes = [ray_cluster.add_node(num_cpus=1) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    try:
        result = train(digits_config(name="digits-spread", train={
            "num_workers": 3, "epochs": 2, "placement_strategy": "SPREAD",
        }))
        assert len(set(result.worker_nodes)) == 3, result.worker_nodes
        tags = client().get_run(result.run_id).data.tags
        assert len(set(tags["mlray.worker_nodes"].split(","))) == 3
    finally:
        for node in nodes:
            ray_cluster.remove_node(node)

