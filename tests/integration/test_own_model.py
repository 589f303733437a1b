"""Your own data and task on a real cluster: regression on scikit-learn's diabetes table read through Ray
Data, gated on rmse and served; and bad inputs that fail before any worker starts, leaving no run and no
registered version behind."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import requests

from mlray.config import parse_config
from mlray.errors import ConfigError, DataError, PromotionRefused
from mlray.registry.tracking import REGRESSION_EPOCH_METRICS, client
from tests.conftest import deploy_app

pytestmark = pytest.mark.integration

FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


@pytest.fixture(scope="module")
def diabetes_csv(tmp_path_factory) -> str:
    """sklearn's bundled diabetes data (442 rows, 10 features, a disease-progression target), as a user's CSV."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)
    frame = pd.DataFrame(bunch.data, columns=FEATURES)
    frame["progression"] = bunch.target
    path = tmp_path_factory.mktemp("diabetes") / "diabetes.csv"
    frame.to_csv(path, index=False)
    return str(path)


def diabetes_config(source: str, **train):
    return parse_config({
        "name": "diabetes", "task": "regression", "seed": 42,
        "data": {"source": source, "label_column": "progression"},
        "model": {"arch": "mlp", "hidden": [32], "dropout": 0.0},
        "train": {"num_workers": 2, "epochs": 30, "batch_size": 16, "lr": 0.01, "weight_decay": 0.01, **train},
        "registry": {"gate": {"metric": "test_rmse", "direction": "minimize"}},
    })


def _splits(source: str, seed: int = 42):
    """The rows of each split exactly as mlray.training.data assigns them (a seeded hash of each row's values)."""
    from mlray.training.data import _hash_uniform, _row_keys, _split_ids

    frame = pd.read_csv(source)
    x = frame[FEATURES].to_numpy(np.float32)
    y = frame["progression"].to_numpy(np.float32)
    split = _split_ids(_hash_uniform(_row_keys(x), seed), 0.15, 0.15)
    return x, y, split


@pytest.fixture(scope="module")
def regression(ray_session, diabetes_csv):
    from mlray.training.train import train

    return train(diabetes_config(diabetes_csv))


def test_regression_on_diabetes_is_as_good_as_ridge(regression, diabetes_csv):
    from sklearn.linear_model import Ridge

    x, y, split = _splits(diabetes_csv)
    train_rows, test_rows = split == 0, split == 2
    mean, std = x[train_rows].mean(0), x[train_rows].std(0)
    ridge = Ridge(alpha=1.0).fit((x[train_rows] - mean) / std, y[train_rows])
    ridge_rmse = float(np.sqrt(np.mean((ridge.predict((x[test_rows] - mean) / std) - y[test_rows]) ** 2)))
    print(f"\ndiabetes test RMSE: mlray mlp {regression.test_rmse:.2f}, scikit-learn Ridge {ridge_rmse:.2f} "
          f"(ratio {regression.test_rmse / ridge_rmse:.3f}; test rows {int(test_rows.sum())})")
    assert regression.test_rmse <= 1.10 * ridge_rmse

    run = client().get_run(regression.run_id)
    metrics = run.data.metrics
    assert {"test_rmse", "test_mae", "test_r2", "test_loss", "final_val_rmse"} <= set(metrics)
    assert "test_accuracy" not in metrics and 0.2 < metrics["test_r2"] < 1
    for key in REGRESSION_EPOCH_METRICS:
        steps = [m.step for m in client().get_metric_history(regression.run_id, key)]
        assert sorted(steps) == list(range(30)), f"{key}: one value per epoch, got {steps}"
    report = {a.path for a in client().list_artifacts(regression.run_id, "report")}
    assert "report/learning_curve.png" in report and "report/confusion_matrix.png" not in report


def test_the_gate_minimizes_rmse(regression, diabetes_csv):
    from mlray.registry import get_version, promote
    from mlray.training.train import train

    gate = diabetes_config(diabetes_csv).registry.gate
    promote("diabetes", version=regression.version, alias="champion", gate=gate)
    worse = train(diabetes_config(diabetes_csv, epochs=1, num_workers=1, lr=0.0005))
    assert worse.test_rmse > regression.test_rmse
    with pytest.raises(PromotionRefused, match=r"test_rmse .* is not better than .* \(minimize"):
        promote("diabetes", version=worse.version, alias="champion", gate=gate)
    assert get_version("diabetes", alias="champion").version == regression.version


def test_served_regression_answers_numbers_equal_to_offline(regression, diabetes_csv, serve_port):
    from mlray.registry import promote
    from mlray.serving.loader import load_registered

    promote("diabetes", version=regression.version, alias="champion", force=True)
    url = deploy_app("diabetes", {"model": "diabetes", "alias": "champion"}, port=serve_port)
    x, _, _ = _splits(diabetes_csv)
    rows = x[:50]
    offline = load_registered("diabetes", alias="champion").loaded.predict(rows)[:, 0]  # (N,)

    v1 = requests.post(f"{url}/v1/models/diabetes:predict", json={"instances": rows.tolist()}, timeout=30)
    assert v1.status_code == 200, v1.text
    assert "labels" not in v1.json()
    np.testing.assert_allclose(v1.json()["predictions"], offline, rtol=1e-5, atol=1e-3)

    v2 = requests.post(f"{url}/v2/models/diabetes/infer", timeout=30, json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": list(rows.shape), "data": rows.reshape(-1).tolist()}]})
    assert v2.status_code == 200, v2.text
    (out,) = v2.json()["outputs"]
    assert out["name"] == "predictions" and out["datatype"] == "FP32" and out["shape"] == [50, 1]
    np.testing.assert_allclose(out["data"], offline, rtol=1e-5, atol=1e-3)

    mlflow_body = {"dataframe_split": {"columns": FEATURES, "data": rows.astype(float).tolist()}}
    inv = requests.post(f"{url}/invocations", json=mlflow_body, timeout=30)
    assert inv.status_code == 200, inv.text
    np.testing.assert_allclose(inv.json()["predictions"], offline, rtol=1e-5, atol=1e-3)

    from ray import serve

    serve.delete("diabetes")


def _no_trace(name: str) -> None:
    """Nothing recorded: no experiment runs, no registered versions."""
    experiment = client().get_experiment_by_name(name)
    assert experiment is None or client().search_runs([experiment.experiment_id]) == []
    assert client().search_model_versions(f"name='{name}'") == []


def _table(tmp_path, label) -> str:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(len(label), 3)), columns=list("abc"))
    frame["label"] = label
    path = tmp_path / "table.csv"
    frame.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize(("label", "extra", "message"), [
    ([0, 1, 2, -1] * 25, {}, r"data.label_column 'label' of '.*table.csv' has values from -1 to 2; classification "
                             r"labels must be class ids in 0..K-1"),
    ([0, 1, 2, 3] * 25, {"num_classes": 3}, r"has values from 0 to 3; classification labels must be class ids "
                                            r"in 0..2"),
    ([0, 1, 1.5, 2] * 25, {}, r"has 25 non-integer value\(s\)"),
    (["cat", "dog"] * 50, {}, r"data.label_column 'label' of '.*table.csv' holds string values; task "
                              r"'classification' needs whole-number class ids"),
])
def test_bad_class_labels_fail_before_any_worker(ray_session, tmp_path, label, extra, message):
    from mlray.training.train import train

    cfg = parse_config({"name": "badlabels2", "data": {"source": _table(tmp_path, label), "label_column": "label",
                                                       **extra}, "train": {"epochs": 1}})
    with pytest.raises(DataError, match=message):
        train(cfg)
    _no_trace("badlabels2")


def test_a_regression_target_that_is_not_numeric(ray_session, tmp_path):
    from mlray.training.train import train

    cfg = parse_config({"name": "badtarget", "task": "regression",
                        "data": {"source": _table(tmp_path, ["low", "high"] * 50), "label_column": "label"}})
    with pytest.raises(DataError, match=r"data.label_column 'label' of '.*' holds string values; task 'regression' "
                                        r"needs a numeric regression target"):
        train(cfg)
    _no_trace("badtarget")


def test_a_factory_that_does_not_import_fails_before_a_run(ray_session):
    from mlray.training.train import train

    cfg = parse_config({"name": "badfactory", "model": {"factory": "nosuchpkg.nets:mlp"}, "train": {"epochs": 1}})
    with pytest.raises(ConfigError, match="model.factory 'nosuchpkg.nets:mlp': module 'nosuchpkg.nets' does not"):
        train(cfg)
    _no_trace("badfactory")
