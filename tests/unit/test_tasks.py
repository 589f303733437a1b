"""task: classification | regression: config checks, the regression step, and what each protocol answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlray.artifact import load_model_dir, pyfunc_output, write_model_dir
from mlray.config import parse_config
from mlray.errors import ConfigError, InvalidInput
from mlray.models import ModelSpec
from mlray.serving import oip, outputs, scoring
from mlray.training.loop import LoopConfig, evaluate, new_training_state, train_epoch

FILE = {"source": "table.csv", "label_column": "y"}


def test_regression_gates_on_test_rmse_by_default():
    cfg = parse_config({"task": "regression", "data": FILE})
    assert (cfg.registry.gate.metric, cfg.registry.gate.direction) == ("test_rmse", "minimize")
    assert cfg.loss == "mse" and parse_config({}).loss == "cross_entropy"
    r2 = parse_config({"task": "regression", "data": FILE, "registry": {"gate": {"metric": "test_r2"}}})
    assert r2.registry.gate.direction == "maximize"


@pytest.mark.parametrize(("raw", "message"), [
    ({"task": "regression"}, "task 'regression' needs a CSV/Parquet data.source"),
    ({"task": "regression", "data": FILE, "registry": {"gate": {"metric": "test_accuracy"}}},
     "registry.gate.metric 'test_accuracy' is not recorded for task 'regression'"),
    ({"task": "regression", "data": FILE, "registry": {"gate": {"metric": "test_rmse", "direction": "maximize"}}},
     "registry.gate.direction 'maximize' is wrong for 'test_rmse'"),
    ({"registry": {"gate": {"metric": "test_rmse", "direction": "minimize"}}},
     "registry.gate.metric 'test_rmse' is not recorded for task 'classification'"),
    ({"train": {"loss": "mse"}}, "train.loss 'mse' does not fit task 'classification'"),
    ({"task": "forecasting"}, "task: Input should be 'classification' or 'regression'"),
])
def test_task_errors_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def _regression(tmp_path: Path | None = None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = (x @ np.array([3.0, -2.0, 1.0, 0.5], dtype=np.float32) * 10 + 200).astype(np.float32)  # scale far from 1
    spec = ModelSpec(factory="mlray.models:mlp", num_features=4, num_outputs=1, kwargs={"hidden": [16]},
                     task="regression")
    cfg = LoopConfig(model=spec.to_dict(), mean=x.mean(0).tolist(), std=x.std(0).tolist(), epochs=1,
                     batch_size=32, lr=0.01, weight_decay=0.0, seed=0, loss="mse",
                     target_mean=[float(y.mean())], target_std=[float(y.std())])
    return cfg, torch.tensor(x), torch.tensor(y)


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_regression_learns_a_linear_target_in_its_own_units(loss):
    cfg, x, y = _regression()
    model, opt, _ = new_training_state(cfg)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    before = evaluate(model, batches, task="regression", loss=loss)[0].metrics("regression")
    for _ in range(40):
        train_epoch(model, opt, batches, task="regression", loss=loss)
    after = evaluate(model, batches, task="regression", loss=loss)[0].metrics("regression")
    assert after["rmse"] < 0.25 * before["rmse"] and after["r2"] > 0.9, (before, after)
    assert after["mae"] <= after["rmse"]


def _loaded(tmp_path: Path, task: str):
    if task == "regression":
        cfg, _, _ = _regression()
        model, _, _ = new_training_state(cfg)
        write_model_dir(tmp_path, model=model, feature_names=list("abcd"), class_names=[])
    else:
        spec = ModelSpec(factory="mlray.models:mlp", num_features=4, num_outputs=3, kwargs={"hidden": [8]})
        cfg = LoopConfig(model=spec.to_dict(), mean=[0.0] * 4, std=[1.0] * 4, epochs=1, batch_size=8, lr=0.1,
                         weight_decay=0.0, seed=0)
        model, _, _ = new_training_state(cfg)
        write_model_dir(tmp_path, model=model, feature_names=list("abcd"), class_names=["a", "b", "c"])
    return load_model_dir(tmp_path, device="cpu")


def _v2(values: np.ndarray, loaded, **request: object) -> dict:
    names = tuple(out["name"] for out in outputs.v2_output_metadata(loaded))
    parsed = oip.parse_infer({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}],
                              **request}, num_features=4, max_rows=8, output_names=names)
    return oip.tensors_response(outputs.v2_tensors(values, loaded), model_name="m", model_version="1",
                                request=parsed)[0]


def test_regression_answers_numbers_in_every_protocol(tmp_path):
    loaded = _loaded(tmp_path, "regression")
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    values = loaded.predict(x)
    assert values.shape == (3, 1)
    v1 = outputs.v1_fields(values, loaded)
    assert list(v1) == ["predictions"] and v1["predictions"] == pytest.approx(values[:, 0].tolist())
    v2 = _v2(values, loaded, id="r")
    assert v2["id"] == "r" and v2["outputs"] == [{"name": "predictions", "datatype": "FP32", "shape": [3, 1],
                                                  "data": pytest.approx(values.reshape(-1).tolist())}]
    with pytest.raises(InvalidInput, match=r"this model's outputs are \['predictions'\]"):
        _v2(values, loaded, outputs=[{"name": "probabilities"}])
    assert outputs.v2_output_metadata(loaded) == [{"name": "predictions", "datatype": "FP32", "shape": [-1, 1]}]
    # /invocations: as mlflow models serve answers for this model's pyfunc (a number per row)
    assert scoring.invocations_response(outputs.invocations(values, loaded)) == {
        "predictions": pytest.approx(values[:, 0].tolist())}
    assert pyfunc_output(loaded, values).shape == (3,)
    assert outputs.agree(values, values + 1e-7, loaded) and not outputs.agree(values, values + 1.0, loaded)


def test_classification_answers_are_unchanged(tmp_path):
    loaded = _loaded(tmp_path, "classification")
    probs = loaded.predict(np.zeros((2, 4), dtype=np.float32))
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-6)
    v1 = outputs.v1_fields(probs, loaded)
    assert set(v1) == {"predictions", "labels"} and v1["labels"][0] in ("a", "b", "c")
    assert [o["name"] for o in _v2(probs, loaded)["outputs"]] == ["probabilities", "label"]
    assert scoring.invocations_response(outputs.invocations(probs, loaded)) == {"predictions": probs.tolist()}


def test_a_sweep_optimises_a_metric_of_the_task_in_its_direction():
    with pytest.raises(ConfigError, match="tune.metric 'val_accuracy' is not recorded for task 'regression'"):
        parse_config({"task": "regression", "data": FILE, "tune": {}})
    with pytest.raises(ConfigError, match="tune.mode 'max' is wrong for 'val_rmse': rmse is better when it goes down"):
        parse_config({"task": "regression", "data": FILE, "tune": {"metric": "val_rmse", "mode": "max"}})
    assert parse_config({"task": "regression", "data": FILE, "tune": {"metric": "val_rmse", "mode": "min"}}).tune
