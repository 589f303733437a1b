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


def test_placement_groups_of_dead_actors_are_released(ray_cluster):
    """What a trial stopped by ASHA leaves: a group created by an actor that is now dead (Ray keeps it
    until the job ends). Groups of the driver and of live actors stay."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from mlray.training.tune import release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self) -> str:
            group = placement_group([{"CPU": 1}])
            ray.get(group.ready())
            return group.id.hex()

    doomed, living = Creator.remote(), Creator.remote()
    orphan, kept = ray.get(doomed.make.remote()), ray.get(living.make.remote())
    own = placement_group([{"CPU": 0.5}])
    ray.get(own.ready())
    ray.kill(doomed)
    wait_for(lambda: ray.util.placement_group_table()[orphan]["state"] == "CREATED", timeout=10,
             what="the orphan")  # Ray itself keeps it: this job is alive
    try:
        assert wait_for(release_orphaned_placement_groups, timeout=10, what="the dead actor's group") == [orphan]
        table = ray.util.placement_group_table()
        assert table[orphan]["state"] == "REMOVED"
        assert table[kept]["state"] == "CREATED" and table[own.id.hex()]["state"] == "CREATED"
        assert release_orphaned_placement_groups() == []
    finally:
        remove_placement_group(own)
        ray.kill(living)
        # the living actor's group is an orphan now: released like the first
        wait_for(lambda: release_orphaned_placement_groups() is not None and
                 ray.util.placement_group_table()[kept]["state"] == "REMOVED", timeout=10,
                 what="the test's groups gone")


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
    # A trial ASHA stops leaves its Train workers' placement group behind (this test cluster has no dashboard,
    # so Ray Train's own cleaner cannot see the controller die). If a later trial started, it got the CPUs
    # because mlray released that group. (One trial at a time; none before the resumed sweep was stopped.)
    by_start = sorted(children, key=lambda r: r.info.start_time)
    if any(r.info.status == "KILLED" for r in by_start[:-1]):
        assert "Released placement group" in second.stderr
    assert client().get_run(parent).info.status == "FINISHED"

    versions = client().search_model_versions("name='digits'")
    sweep_versions = [v for v in versions if v.tags.get(SWEEP_TAG) == SWEEP]
    assert len(sweep_versions) == 1
    best = sweep_versions[0]
    assert best.run_id == result["best_run_id"] and best.tags[TRIAL_TAG] in by_trial
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert max(r.data.metrics["val_accuracy"] for r in finished) == pytest.approx(result["best_metric"])
