"""The sweep's pieces that need no cluster: the search space handed to Ray Tune, and choosing, marking and
registering the best trial from what MLflow recorded (a real SQLite store)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mlray.config import TuneSettings, parse_config
from mlray.errors import TrainingFailed
from mlray.registry import get_version, register
from mlray.registry.tracking import client, experiment_id
from mlray.training.train import MODEL_URI_TAG
from mlray.training.tune import SWEEP_TAG, TRIAL_TAG, _register_best, search_space


def test_search_space_becomes_tune_samplers():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = search_space(TuneSettings(search_space={
        "train.lr": {"loguniform": [1e-4, 1e-1]}, "train.batch_size": {"choice": [32, 64]},
        "model.hidden": {"grid": [16, 32]}, "train.dropout": {"uniform": [0.0, 0.5]},
        "train.seed": {"randint": [0, 10]},
    }))
    assert isinstance(space["train.lr"], Float) and (space["train.lr"].lower, space["train.lr"].upper) == (1e-4, 1e-1)
    assert isinstance(space["train.lr"].get_sampler(), Float._LogUniform)
    assert isinstance(space["train.batch_size"], Categorical) and space["train.batch_size"].categories == [32, 64]
    assert space["model.hidden"] == {"grid_search": [16, 32]}
    assert isinstance(space["train.dropout"], Float) and space["train.dropout"].upper == 0.5
    seed = space["train.seed"]
    assert isinstance(seed, Integer) and (seed.lower, seed.upper) == (0, 10)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLRAY_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _sweep(trials: list[tuple[str, str, float | None]], mode: str = "max") -> tuple[object, str, str]:
    """A sweep's parent run and one child run per (trial id, status, metric): val_accuracy, or val_loss for
    mode "min" (a sweep's metric must be better in its mode's direction)."""
    metric_name = "val_accuracy" if mode == "max" else "val_loss"
    cfg = parse_config({"name": "m", "tune": {"metric": metric_name, "mode": mode}})
    mlflow_client = client()
    experiment = experiment_id("m")
    parent = mlflow_client.create_run(experiment, tags={SWEEP_TAG: "s1", "mlray.role": "sweep"}).info.run_id
    for trial, status, metric in trials:
        run = mlflow_client.create_run(experiment, tags={"mlflow.parentRunId": parent, TRIAL_TAG: trial})
        run_id = run.info.run_id
        mlflow_client.log_param(run_id, "trial.train.lr", str(len(trial)))
        if metric is not None:
            mlflow_client.log_metric(run_id, metric_name, metric)
        if status == "FINISHED":
            mlflow_client.set_tag(run_id, MODEL_URI_TAG, f"{run.info.artifact_uri}/model")
            mlflow_client.set_tag(run_id, "mlray.weights_sha256", "ab" * 32)
            mlflow_client.set_terminated(run_id, "FINISHED")
    return cfg, parent, experiment


def test_the_best_finished_trial_is_registered_and_stopped_ones_are_marked(store):
    cfg, parent, experiment = _sweep([("t1", "FINISHED", 0.91), ("t2", "FINISHED", 0.95),
                                      ("t3", "RUNNING", 0.99), ("t4", "FINISHED", 0.93)])
    grid = [SimpleNamespace(metrics={"trial_id": "t2"}, config={"train.lr": 0.01}),
            SimpleNamespace(metrics={}, config={})]  # Tune's results, as far as they got
    result = _register_best(cfg, grid, "s1", parent, experiment, register)
    assert result.best_metric == 0.95 and result.best_config == {"train.lr": 0.01} and result.trials == 2
    version = get_version("m", version=result.version)
    assert version.tags[TRIAL_TAG] == "t2" and version.tags[SWEEP_TAG] == "s1"
    stopped = [r for r in client().search_runs([experiment], f"tags.`{TRIAL_TAG}` = 't3'")][0]
    # ASHA stopped t3 (0.99 but no model): not chosen, and its run no longer reads RUNNING.
    assert stopped.info.status == "KILLED" and stopped.data.tags["mlray.stopped_by"] == "ASHA early stopping"
    assert client().get_run(parent).data.tags["mlray.best_run_id"] == result.best_run_id


def test_mode_min_chooses_the_lowest_and_falls_back_to_the_recorded_params(store):
    cfg, parent, experiment = _sweep([("t1", "FINISHED", 0.3), ("trial2", "FINISHED", 0.2)], mode="min")
    result = _register_best(cfg, [], "s1", parent, experiment, register)
    assert result.best_metric == 0.2 and result.best_config == {"train.lr": "6"}  # from the run's trial.* params


def test_a_sweep_without_a_finished_trial_fails(store):
    cfg, parent, experiment = _sweep([("t1", "RUNNING", 0.5)])
    with pytest.raises(TrainingFailed, match="sweep 's1': no trial finished with a model"):
        _register_best(cfg, [], "s1", parent, experiment, register)
