"""Acceptance (a): 2-worker DDP training on digits, recorded and registered in a real MLflow store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlray.config import parse_config
from mlray.errors import ConfigError
from mlray.registry.tracking import EPOCH_METRICS, client
from tests.conftest import digits_config

pytestmark = pytest.mark.integration


def test_two_workers_reach_accuracy_and_record_everything(trained):
    assert trained.test_accuracy >= 0.95
    mlflow_client = client()
    run = mlflow_client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.num_workers"] == "2" and params["model.arch"] == "mlp"
    assert params["data.size.train"] == "1256" and params["data.num_features"] == "64"
    epochs = digits_config().train.epochs
    for key in EPOCH_METRICS:
        steps = [m.step for m in mlflow_client.get_metric_history(trained.run_id, key)]
        assert sorted(steps) == list(range(epochs)), f"{key}: one value per epoch, got steps {steps}"
    assert run.data.metrics["test_accuracy"] == pytest.approx(trained.test_accuracy)

    report = {a.path for a in mlflow_client.list_artifacts(trained.run_id, "report")}
    assert {"report/learning_curve.png", "report/confusion_matrix.png", "report/confusion_matrix.json"} <= report

    version = mlflow_client.get_model_version("digits", str(trained.version))
    assert version.run_id == trained.run_id
    tags = version.tags
    for key in ("git.commit", "data.fingerprint", "mlray.version", "mlray.weights_sha256"):
        assert tags.get(key), f"version tag {key} missing: {tags}"
    assert len(tags["git.commit"]) == 40 and len(tags["data.fingerprint"]) == 64


def test_logged_model_has_signature_and_loads_as_pyfunc(trained):
    import mlflow

    from mlray.serving.loader import load_registered
    from mlray.training.data import sample_test_rows

    model = mlflow.pyfunc.load_model(f"models:/digits/{trained.version}")
    inputs = model.metadata.get_input_schema().input_names()
    assert len(inputs) == 64 and inputs[0] == "pixel_0_0"
    x, y = sample_test_rows(parse_config({}).data, seed=42, count=40)
    via_pyfunc = np.asarray(model.predict(pd.DataFrame(x.astype(np.float64), columns=inputs)))
    via_mlray = load_registered("digits", version=trained.version).loaded.predict_proba(x)
    np.testing.assert_allclose(via_pyfunc, via_mlray, atol=1e-6)
    assert (via_mlray.argmax(1) == y).mean() >= 0.9


def test_bad_architecture_fails_before_a_run_is_created(ray_session):
    from mlray.training.train import train

    before = len(client().search_runs([e.experiment_id for e in client().search_experiments()]))
    with pytest.raises(ConfigError, match="model.arch 'transformer' is not known"):
        train(parse_config({"name": "nope", "model": {"arch": "transformer"}}))
    after = len(client().search_runs([e.experiment_id for e in client().search_experiments()]))
    assert before == after
