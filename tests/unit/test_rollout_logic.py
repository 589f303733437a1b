"""Following the registry without Ray: the real RegistryWatcher and Follower in one event loop, on a real
MLflow registry (SQLite). Two things stand in for what cannot exist without a cluster: the Serve handle
between them (an in-process call) and the model files (a version tagged ``broken`` fails to load, as a
corrupt upload does; others load as a small stand-in model)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mlray.errors import ModelLoadError, NotFound
from mlray.registry import get_version, promote, register, set_challenger_weight
from mlray.registry.tracking import client, experiment_id
from mlray.serving.config import ServeAppConfig
from mlray.serving.loader import ServedModel
from mlray.serving.metrics import ServingMetrics
from mlray.serving.rollout import Follower, RegistryWatcher, resolve_targets
from mlray.serving.traffic import BOUNDARIES_S


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLRAY_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _version(name: str = "m", *, broken: bool = False) -> int:
    mlflow_client = client()
    run = mlflow_client.create_run(experiment_id(name))
    mlflow_client.log_metric(run.info.run_id, "test_accuracy", 0.9)
    tags = {"broken": "1"} if broken else {}
    return register(name, model_uri=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags).version


class _InProcess:
    """Stands in for a Serve handle: ``handle.method.remote(*args)`` awaits the object's method here."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)

        class _Remote:
            @staticmethod
            async def remote(*args: Any) -> Any:
                result = method(*args)
                return await result if asyncio.iscoroutine(result) else result

        return _Remote


class _Model:
    num_features, class_names = 4, ["a", "b"]


class _Follower(Follower):
    def _load_and_warm(self, version: int) -> ServedModel:
        info = get_version(self.cfg.model, version=version)
        if info.tags.get("broken"):
            raise ModelLoadError(f"version {version}: weights do not match their recorded sha256")
        return ServedModel(loaded=_Model(), info=info, alias=None, load_seconds=0.0)  # type: ignore[arg-type]


async def _watcher(settings: dict[str, Any]) -> Any:
    cls = RegistryWatcher.func_or_class  # the class under Serve's decorator
    watcher = object.__new__(cls)
    await cls.__init__(watcher, settings)
    return watcher


SETTINGS = {"model": "m", "alias": "champion", "follow": {"poll_interval_s": 3600, "retry_failed_after_s": 60},
            "challenger": {"alias": "challenger", "mode": "shadow"}}


def test_resolve_targets(store):
    v1, v2 = _version(), _version()
    promote("m", version=v1)
    cfg = ServeAppConfig.model_validate(SETTINGS)
    assert resolve_targets(cfg) == {"champion": v1, "challenger": None}  # no challenger alias yet
    promote("m", version=v2, alias="challenger")
    assert resolve_targets(cfg) == {"champion": v1, "challenger": v2}
    assert resolve_targets(ServeAppConfig.model_validate({"model": "m", "alias": None, "version": v2})) == {
        "champion": v2}
    with pytest.raises(NotFound, match="has no alias @champion"):
        resolve_targets(ServeAppConfig.model_validate({"model": "other", "alias": "champion"}))


def test_a_replica_follows_the_alias_and_a_broken_version_never_answers(store):
    async def scenario() -> None:
        v1 = _version()
        promote("m", version=v1)
        watcher = await _watcher(SETTINGS)
        cfg = ServeAppConfig.model_validate(SETTINGS)
        follower = _Follower(cfg, _InProcess(watcher), replica="r1", node="n1", metrics=ServingMetrics())
        await follower.start()
        assert follower.report()["versions"] == {"champion": v1}

        await follower.sync_once()  # the watcher hears what the replica serves
        status = watcher.status()
        assert status["on_target"] and status["last_good"] == {"champion": v1}

        v2 = _version(broken=True)  # a corrupt upload is promoted (forced past the gate)
        promote("m", version=v2, force=True)
        assert await watcher.refresh() == {"champion": v2, "challenger": None}
        await follower.sync_once()
        assert follower.report()["versions"] == {"champion": v1}  # v1 keeps answering
        assert "weights do not match" in follower.failures[f"champion:v{v2}"]
        failed_at = follower._failed_at[f"champion:v{v2}"]
        await follower.sync_once()  # within retry_failed_after_s: not tried again
        assert follower._failed_at[f"champion:v{v2}"] == failed_at
        await follower.sync_once()
        status = watcher.status()
        assert not status["on_target"] and f"champion:v{v2}" in status["failures"]["r1"]
        assert watcher._settled()  # every live replica acted: a rollout may return

        v3 = _version()
        promote("m", version=v3, force=True)
        await watcher.refresh()
        await follower.sync_once()
        assert follower.report()["versions"] == {"champion": v3} and follower.failures == {}

        promote("m", version=v1, alias="challenger")
        await watcher.refresh()
        await follower.sync_once()
        assert follower.report()["versions"] == {"champion": v3, "challenger": v1}
        client().delete_registered_model_alias("m", "challenger")
        await watcher.refresh()
        await follower.sync_once()
        assert follower.report()["versions"] == {"champion": v3}  # the challenger stops answering

    asyncio.run(scenario())


def test_a_replica_starting_on_a_broken_champion_falls_back_to_the_last_good(store):
    async def scenario() -> None:
        v1 = _version()
        promote("m", version=v1)
        watcher = await _watcher(SETTINGS)
        cfg = ServeAppConfig.model_validate(SETTINGS)
        first = _Follower(cfg, _InProcess(watcher), replica="r1", node="n1", metrics=ServingMetrics())
        await first.start()
        await first.sync_once()
        v2 = _version(broken=True)
        promote("m", version=v2, force=True)
        await watcher.refresh()

        # A replica started now (a scale-up) is told v2, cannot load it, and starts on v1 instead.
        second = _Follower(cfg, _InProcess(watcher), replica="r2", node="n1", metrics=ServingMetrics())
        await second.start()
        assert second.report()["versions"] == {"champion": v1}

        # With no version that ever answered, a replica cannot start on a broken champion.
        fresh = await _watcher(SETTINGS)
        third = _Follower(cfg, _InProcess(fresh), replica="r3", node="n1", metrics=ServingMetrics())
        with pytest.raises(ModelLoadError):
            await third.start()

    asyncio.run(scenario())


def test_the_watcher_records_shadow_comparisons_and_events(store):
    async def scenario() -> None:
        promote("m", version=_version())
        watcher = await _watcher(SETTINGS)
        report = {"replica": "r1", "versions": {"champion": 1}, "failures": {},
                  "shadow": [{"agree": True}, {"agree": False}, {"agree": True}]}
        answer = await watcher.sync(report)
        assert answer == {"targets": {"champion": 1, "challenger": None}, "last_good": {"champion": 1},
                          "challenger_weight": None}
        # The registry's weight reaches the replicas on their next sync; their counters add up in traffic().
        set_challenger_weight("m", 0.25)
        await watcher.refresh()
        counts = {"requests": 3, "errors": 1, "buckets": [3] + [0] * len(BOUNDARIES_S)}
        answer = await watcher.sync({**report, "shadow": [], "traffic": {"challenger:v2": counts}})
        assert answer["challenger_weight"] == 0.25
        await watcher.sync({**report, "replica": "r2", "shadow": [], "traffic": {"challenger:v2": counts},
                            "challenger_weight": 0.25})
        traffic = watcher.traffic()
        assert traffic["counts"]["challenger:v2"]["requests"] == 6 and traffic["counts"]["challenger:v2"]["errors"] == 2
        assert traffic["applied_weights"] == {"r1": None, "r2": 0.25}
        status = watcher.status()
        assert status["shadow"] == {"compared": 3, "agreed": 2}
        assert any("replica r1 answers champion with version 1" in e["message"] for e in status["events"])
        assert watcher.shadow_records(2) == [{"agree": False}, {"agree": True}]

    asyncio.run(scenario())

