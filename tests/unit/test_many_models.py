"""One app, many models, without Ray: routing by name, 404 for a name not served, the header that names the
model of /invocations, bounded cold loads (503 + Retry-After), a model that cannot load next to ones that
can, and the app settings that list them."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from pydantic import ValidationError

from mlray.errors import ConfigError, ModelLoadError
from mlray.serving import routes
from mlray.serving.config import ServeAppConfig
from mlray.serving.core import Call, PredictionCore
from mlray.serving.http import render_error
from mlray.serving.multi import AFFINITY_HEADER, MODEL_HEADER, ModelSet, Slot
from tests.unit.serving_app import FEATURES, Versions, served_model

ROW = [1.0] * len(FEATURES)


def _call(method: str, path: str, body: object = None, headers: dict[str, str] | None = None) -> Call:
    found = routes.match(method, path)
    assert found is not None, path
    route, params = found
    data = json.dumps(body).encode() if body is not None else b""

    async def read() -> bytes:
        return data

    return Call(route, params, headers or {}, read)


def _models(names: list[str], **settings: object) -> ServeAppConfig:
    return ServeAppConfig.model_validate({"models": [{"name": n} for n in names], "max_rows": 16, **settings})


class Loader:
    """Loads a model in ``delay_s``; the names in ``broken`` fail as a refused pickle would."""

    def __init__(self, cfg: ServeAppConfig, *, delay_s: float = 0.0, broken: tuple[str, ...] = ()) -> None:
        self.cfg, self.delay_s, self.broken = cfg, delay_s, broken
        self.loads: list[str] = []

    async def __call__(self, name: str) -> Slot:
        self.loads.append(name)
        await asyncio.sleep(self.delay_s)
        if name in self.broken:
            raise ModelLoadError("refused to load a pickle: its python_function flavour is a cloudpickled PythonModel")
        served = served_model()
        served = dataclasses.replace(served, info=dataclasses.replace(served.info, name=name))
        entry = next(e for e in self.cfg.entries if e.name == name)
        return Slot(core=PredictionCore(self.cfg.for_model(entry), Versions({"champion": served})))


async def _answer(models: ModelSet, call: Call) -> tuple[int, dict, dict]:
    try:
        body, headers = await models.answer(call)
        return 200, body, headers  # type: ignore[return-value]
    except Exception as err:  # noqa: BLE001 - rendered as the HTTP layer renders it
        return render_error(call.route.kind, err)


def test_requests_go_to_the_model_named_in_the_url_or_header_and_unknown_names_are_404():
    cfg = _models(["iris", "wine", "digits"], max_models_per_replica=2)
    loader = Loader(cfg)

    async def scenario() -> None:
        models = ModelSet(cfg, open_slot=loader, held=lambda: 2)
        await models.start()
        assert loader.loads == ["iris", "wine"]  # pre-warmed up to the bound
        for name in ("wine", "digits"):
            status, body, headers = await _answer(models, _call("POST", f"/v1/models/{name}:predict",
                                                                {"instances": [ROW]}))
            assert status == 200 and headers["x-model-name"] == name and body["model_name"] == name
            assert headers["x-models-loaded"] == "2"
        status, body, _ = await _answer(models, _call("POST", "/v2/models/nope/infer", {"inputs": []}))
        assert status == 404 and "model 'nope' is not served here" in json.dumps(body)
        status, body, _ = await _answer(models, _call("POST", "/invocations", {"instances": [ROW]}))
        assert status == 400 and MODEL_HEADER in json.dumps(body)
        status, body, headers = await _answer(models, _call("POST", "/invocations", {"instances": [ROW]},
                                                            {MODEL_HEADER: "iris"}))
        assert status == 200 and headers["x-model-name"] == "iris"
        status, body, _ = await _answer(models, _call("GET", "/v2/health/ready"))
        assert status == 200 and body == {"ready": True}

    asyncio.run(scenario())


def test_a_cold_load_past_its_timeout_is_503_with_retry_after_and_then_serves():
    cfg = _models(["iris", "wine"], max_models_per_replica=1, cold_load_timeout_s=0.05)
    loader = Loader(cfg, delay_s=0.2)

    async def scenario() -> None:
        models = ModelSet(cfg, open_slot=loader)
        await models.start()
        status, body, headers = await _answer(models, _call("POST", "/v1/models/wine:predict", {"instances": [ROW]}))
        assert status == 503 and headers["retry-after"] == "1" and "'wine' is still loading" in json.dumps(body)
        await asyncio.sleep(0.3)  # the load went on meanwhile
        loader.delay_s = 0.0
        status, _, headers = await _answer(models, _call("POST", "/v1/models/wine:predict", {"instances": [ROW]}))
        assert status == 200 and headers["x-model-name"] == "wine"

    asyncio.run(scenario())


def test_an_answer_that_waited_for_its_models_load_says_how_long_in_server_timing():
    cfg = _models(["iris", "wine"], max_models_per_replica=1)
    loader = Loader(cfg, delay_s=0.05)
    lru: dict[str, Slot] = {}  # Serve's multiplexing holds the slot it loaded; the ModelSet only weakly

    async def open_slot(name: str) -> Slot:
        if name not in lru:
            lru.clear()  # one model per replica: the other one is evicted
            lru[name] = await loader(name)
        return lru[name]

    async def scenario() -> None:
        models = ModelSet(cfg, open_slot=open_slot, held=lambda: len(lru))
        await models.start()  # iris pre-warmed
        _, _, held = await _answer(models, _call("POST", "/v1/models/iris:predict", {"instances": [ROW]}))
        assert "server-timing" not in held
        status, _, cold = await _answer(models, _call("POST", "/v1/models/wine:predict", {"instances": [ROW]}))
        assert status == 200 and cold["server-timing"].startswith("load;dur=")
        assert float(cold["server-timing"].removeprefix("load;dur=")) >= 50  # the 0.05-s load
        _, _, again = await _answer(models, _call("POST", "/v1/models/wine:predict", {"instances": [ROW]}))
        assert "server-timing" not in again

    asyncio.run(scenario())


def test_a_replica_claims_one_fewer_than_it_keeps_evicts_unclaimed_models_first_and_lets_an_idle_claim_lapse(
        monkeypatch):
    """The affinity header HAProxy's stick table learns from: only where the models outnumber what a replica
    keeps; at most max_models_per_replica - 1 claims, first come (one place for the unclaimed models, which
    are made the first out so that loading them never evicts a claimed one); a claim unused for
    CLAIM_IDLE_S lapses."""
    from collections import OrderedDict

    from mlray.serving import multi

    cfg = _models(["a", "b", "c", "d"], max_models_per_replica=3)
    lru: OrderedDict[str, Slot] = OrderedDict()  # Serve's LRU of 3 (least recently used first), held weakly

    async def open_slot(name: str) -> Slot:
        if name not in lru:
            if len(lru) == 3:
                lru.popitem(last=False)
            lru[name] = await Loader(cfg)(name)
        lru.move_to_end(name)
        return lru[name]

    def evict_first(name: str) -> None:
        lru.move_to_end(name, last=False)

    async def claimed(models: ModelSet, name: str) -> str | None:
        status, _, headers = await _answer(models, _call("POST", f"/v1/models/{name}:predict", {"instances": [ROW]}))
        assert status == 200
        return headers.get(AFFINITY_HEADER)

    async def scenario() -> None:
        models = ModelSet(cfg, open_slot=open_slot, held=lambda: len(lru), evict_first=evict_first)
        await models.start()  # a, b and c pre-warmed
        assert await claimed(models, "a") == "a" and await claimed(models, "b") == "b"
        assert await claimed(models, "c") is None  # two claims already: served, not claimed, first out
        assert await claimed(models, "d") is None
        assert list(lru) == ["d", "a", "b"]  # d's load evicted c, not a (the least recently used)
        assert await claimed(models, "c") is None
        assert list(lru) == ["c", "a", "b"] and await claimed(models, "a") == "a"  # the claimed ones stay
        assert set(models.claims) == {"a", "b"}
        monkeypatch.setattr(multi, "CLAIM_IDLE_S", 0.0)  # b and a unused since: their claims lapse
        await asyncio.sleep(0.01)
        assert await claimed(models, "d") == "d"
        assert set(models.claims) == {"d"}
        monkeypatch.setattr(multi, "CLAIM_IDLE_S", 60.0)

        few = ModelSet(_models(["a", "b"], max_models_per_replica=2), open_slot=open_slot)
        await few.start()
        assert await claimed(few, "a") is None  # every replica keeps every model: no affinity, plain balancing
        one = ModelSet(_models(["a", "b"], max_models_per_replica=1), open_slot=open_slot)
        assert await claimed(one, "a") == "a" and await claimed(one, "b") is None  # keeping one, it claims one

    asyncio.run(scenario())


def test_a_model_that_cannot_load_is_its_own_503_and_the_others_serve():
    cfg = _models(["iris", "pickled"])
    loader = Loader(cfg, broken=("pickled",))

    async def scenario() -> None:
        models = ModelSet(cfg, open_slot=loader)
        await models.start()
        assert "refused to load a pickle" in models.failures["pickled"]
        status, body, _ = await _answer(models, _call("POST", "/v1/models/pickled:predict", {"instances": [ROW]}))
        assert status == 503 and "model 'pickled' cannot be served: refused to load a pickle" in json.dumps(body)
        status, _, _ = await _answer(models, _call("POST", "/v1/models/iris:predict", {"instances": [ROW]}))
        assert status == 200
        assert loader.loads.count("pickled") == 1  # not retried before follow.retry_failed_after_s

    asyncio.run(scenario())


def test_one_model_is_the_simple_case():
    cfg = ServeAppConfig.model_validate({"model": "digits", "max_rows": 16})
    assert [(e.name, e.alias, e.version) for e in cfg.entries] == [("digits", "champion", None)]
    loader = Loader(cfg)

    async def scenario() -> None:
        models = ModelSet(cfg, open_slot=loader)
        await models.start()
        status, _, headers = await _answer(models, _call("POST", "/invocations", {"instances": [ROW]}))
        assert status == 200 and headers["x-model-name"] == "digits" and "x-models-loaded" not in headers
        models.check_health()

    asyncio.run(scenario())


@pytest.mark.parametrize(("settings", "message"), [
    ({"model": "a", "models": [{"name": "b"}]}, "give exactly one of model ('a') or models (1 listed)"),
    ({}, "give exactly one of model"),
    ({"models": [{"name": "a"}, {"name": "a"}]}, "models lists 'a' more than once"),
    ({"models": [{"name": "a", "alias": "x", "version": 2}]}, "give alias ('x') or version (2), not both"),
    ({"models": [{"name": "a/b"}]}, "should match pattern"),
    ({"models": [{"name": "a"}], "challenger": {}}, "challenger: in a many-models app each model has its own"),
])
def test_app_settings_name_what_is_wrong(settings, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServeAppConfig.model_validate(settings)


def test_each_model_gets_its_own_target():
    cfg = _models(["iris"]).model_copy(update={"models": ServeAppConfig.model_validate(
        {"models": [{"name": "iris", "version": 3}, {"name": "wine", "alias": "prod"}]}).models})
    iris, wine = (cfg.for_model(e) for e in cfg.entries)
    assert (iris.model, iris.alias, iris.version, iris.models) == ("iris", None, 3, [])
    assert (wine.model, wine.alias, wine.version) == ("wine", "prod", None)


def test_local_watcher_asks_the_registry_at_most_every_poll_interval_and_survives_an_outage():
    from mlray.serving.multi import LocalWatcher

    cfg = _models(["iris"], follow={"poll_interval_s": 3600})
    asked: list[str] = []
    answers: list[object] = [{"champion": 1}, RuntimeError("registry down")]

    def resolve(model_cfg: ServeAppConfig) -> dict[str, int | None]:
        asked.append(model_cfg.model)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    async def scenario() -> None:
        watcher = LocalWatcher(cfg.for_model(cfg.entries[0]), resolve=resolve)
        report = {"replica": "r1", "versions": {"champion": 1}, "failures": {}}
        assert (await watcher.sync.remote(report))["targets"] == {"champion": 1}
        assert (await watcher.sync.remote(report))["targets"] == {"champion": 1}  # within the interval: cached
        assert asked == ["iris"]
        watcher.asked = -float("inf")  # the interval passed
        assert (await watcher.sync.remote(report))["targets"] == {"champion": 1}  # outage: keeps the targets
        status = await watcher.status.remote()
        assert status["on_target"] and status["replicas"]["r1"]["versions"] == {"champion": 1}

    asyncio.run(scenario())


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A real MLflow registry (SQLite) of its own."""
    monkeypatch.setenv("MLRAY_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlray.registry.tracking import client

    mlflow_client = client()

    def register(name: str, *, tags: dict[str, str], aliases: tuple[str, ...] = ("champion",)) -> None:
        mlflow_client.create_registered_model(name, tags=tags)
        mlflow_client.create_model_version(name, source=str(tmp_path / name))
        for alias in aliases:
            mlflow_client.set_registered_model_alias(name, alias, "1")

    register("fraud-eu", tags={"team": "fraud"})
    register("fraud-us", tags={"team": "fraud"}, aliases=("champion", "challenger"))
    register("fraud-new", tags={"team": "fraud"}, aliases=())  # no @champion yet: not served
    register("churn", tags={"team": "growth"})
    return mlflow_client


def test_models_selected_by_tag_or_pattern_are_listed_by_name_at_deploy(store):
    from mlray.serving.selection import expand

    by_tag = expand(ServeAppConfig.model_validate({"models": [{"tag": "team=fraud"}]}))
    assert [(e.name, e.alias) for e in by_tag.models] == [("fraud-eu", "champion"), ("fraud-us", "champion")]
    any_team = expand(ServeAppConfig.model_validate({"models": [{"tag": "team"}]}))
    assert [e.name for e in any_team.models] == ["churn", "fraud-eu", "fraud-us"]
    # a named entry keeps its own alias where a selection also matches it; the selection adds the rest
    mixed = expand(ServeAppConfig.model_validate(
        {"models": [{"name": "fraud-us", "alias": "challenger"}, {"pattern": "fraud-*"}, {"name": "churn"}]}))
    assert [(e.name, e.alias) for e in mixed.models] == [
        ("fraud-us", "challenger"), ("fraud-eu", "champion"), ("churn", "champion")]
    assert expand(ServeAppConfig.model_validate({"models": [{"pattern": "fraud-?s"}], "alias": None,
                                                 "version": 1})).models[0].name == "fraud-us"
    # a selector that finds no model with its alias fails the deploy, naming it
    with pytest.raises(ConfigError, match=r"pattern 'fraud-n\*' selects no registered model with alias @champion "
                                          r"\(it matches \['fraud-new'\] of 4\)"):
        expand(ServeAppConfig.model_validate({"models": [{"pattern": "fraud-n*"}]}))
    with pytest.raises(ConfigError, match=r"tag 'team=nobody' selects no registered model .* no model"):
        expand(ServeAppConfig.model_validate({"models": [{"tag": "team=nobody"}]}))


@pytest.mark.parametrize(("entry", "message"), [
    ({"tag": "team=fraud", "name": "x"}, "exactly one of name, tag or pattern"),
    ({"alias": "champion"}, "exactly one of name, tag or pattern, got none"),
    ({"pattern": "fraud-*", "version": 2}, "a fixed version is for one named model"),
    ({"tag": "=x"}, "tag"),
])
def test_a_models_entry_names_what_is_wrong(entry, message):
    with pytest.raises(ValidationError, match=message):
        ServeAppConfig.model_validate({"models": [entry]})


def test_the_app_builder_selects_the_models_before_any_replica_starts(store):
    """`serve deploy` of a YAML whose selector finds nothing fails in the builder, naming the entry."""
    from ray import serve

    from mlray.serving.app import application

    assert isinstance(application({"models": [{"tag": "team=fraud"}]}), serve.Application)
    with pytest.raises(ConfigError, match="pattern 'nothing-\\*' selects no registered model"):
        application({"models": [{"pattern": "nothing-*"}]})


def test_models_uris_are_accepted_where_a_serve_yaml_names_a_model():
    one = ServeAppConfig.model_validate({"model": "models:/digits@prod"})
    assert (one.model, one.alias, one.version, one.target) == ("digits", "prod", None, "models:/digits@prod")
    pinned = ServeAppConfig.model_validate({"model": "models:/digits/3"})
    assert (pinned.model, pinned.alias, pinned.version) == ("digits", None, 3)
    many = ServeAppConfig.model_validate({"models": [{"name": "models:/iris@prod"}, {"name": "models:/churn/4"},
                                                     {"name": "digits"}]})
    assert [(e.name, e.alias, e.version) for e in many.models] == [
        ("iris", "prod", None), ("churn", None, 4), ("digits", "champion", None)]
    with pytest.raises(ValidationError, match=r"'models:/digits/3' names version 3, and alias 'prod' is also given"):
        ServeAppConfig.model_validate({"model": "models:/digits/3", "alias": "prod"})
    with pytest.raises(ValidationError, match=r"models entry: model 'models:/iris@' is not a model name"):
        ServeAppConfig.model_validate({"models": [{"name": "models:/iris@"}]})
