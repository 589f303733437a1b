"""The promotion gate on a real MLflow store (SQLite + local artifacts), no Ray needed."""

import pytest

from mlray.config import GateConfig
from mlray.errors import NotFound, PromotionRefused
from mlray.registry import get_version, list_models, promote, register
from mlray.registry.tracking import client, experiment_id


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLRAY_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _version(name: str, accuracy: float) -> int:
    mlflow_client = client()
    run = mlflow_client.create_run(experiment_id(name))
    mlflow_client.log_metric(run.info.run_id, "test_accuracy", accuracy)
    mlflow_client.set_terminated(run.info.run_id)
    source = (run.info.artifact_uri or "") + "/model"
    return register(name, model_uri=source, run_id=run.info.run_id, tags={"t": "1"}).version


def test_gate_refuses_worse_keeps_alias_and_accepts_better(store):
    v1 = _version("m", 0.95)
    first = promote("m", version=v1)
    assert first.previous_version is None and get_version("m", alias="champion").version == v1

    v2 = _version("m", 0.90)
    with pytest.raises(PromotionRefused, match=r"test_accuracy 0\.9000 is not better than 0\.9500 of version 1"):
        promote("m", version=v2)
    assert get_version("m", alias="champion").version == v1

    v3 = _version("m", 0.97)
    accepted = promote("m", version=v3, reason="better")
    assert accepted.previous_version == v1 and not accepted.forced
    tags = get_version("m", version=v3).tags
    assert tags["mlray.promotion.champion.from_version"] == "1"
    assert tags["mlray.promotion.champion.reason"] == "better"
    assert tags["mlray.promotion.champion.forced"] == "false"
    assert tags["mlray.promotion.champion.time"].endswith("Z")
    assert get_version("m", alias="champion").version == v3


def test_force_overrides_and_is_recorded(store):
    v1, v2 = _version("m", 0.95), _version("m", 0.5)
    promote("m", version=v1)
    result = promote("m", version=v2, force=True)
    assert result.forced and get_version("m", alias="champion").version == v2
    assert get_version("m", version=v2).tags["mlray.promotion.champion.forced"] == "true"


def test_min_improvement_and_minimize(store):
    v1, v2 = _version("m", 0.95), _version("m", 0.955)
    promote("m", version=v1)
    with pytest.raises(PromotionRefused):
        promote("m", version=v2, gate=GateConfig(min_improvement=0.01))
    # on a loss-like metric lower is better: 0.955 is worse than 0.95
    with pytest.raises(PromotionRefused, match="minimize"):
        promote("m", version=v2, gate=GateConfig(direction="minimize"))


def test_missing_things_are_named(store):
    with pytest.raises(NotFound, match="registered model 'nope' has no alias @champion"):
        get_version("nope", alias="champion")
    v1 = _version("m", 0.9)
    with pytest.raises(NotFound, match="has no version 99"):
        promote("m", version=99)
    assert [m["name"] for m in list_models()] == ["m"] and list_models()[0]["versions"][0]["version"] == v1
