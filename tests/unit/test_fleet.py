"""A many-models app's watcher state without Ray: per-model status from replica heartbeats (held or not, at
which version, load failures), when a rollout of one model has settled, a replica's followers reading the
targets its heartbeat brought, and how `mlray status` prints it."""

from __future__ import annotations

import asyncio

import pytest

from mlray.errors import NotFound
from mlray.serving.config import ServeAppConfig
from mlray.serving.fleet import LOAD_FAILURE, FleetState

NAMES = ["iris", "wine", "churn"]


def _state() -> FleetState:
    cfg = ServeAppConfig.model_validate({"models": [{"name": "iris"}, {"name": "wine", "alias": "prod"},
                                                    {"name": "churn", "version": 4}], "max_models_per_replica": 2})
    state = FleetState({str(e.name): cfg.for_model(e) for e in cfg.entries}, max_models_per_replica=2, horizon_s=5)
    state.set_targets("iris", {"champion": 3}, now=0)
    state.set_targets("wine", {"champion": 7}, now=0)
    state.set_targets("churn", {"champion": 4}, now=0)
    return state


def _beat(replica: str, held: dict[str, int], *, failures: dict[str, str] | None = None,
          failed_versions: dict[str, dict[str, str]] | None = None) -> dict:
    return {"replica": replica, "node": "n1", "pid": 1, "failures": failures or {},
            "held": {name: {"versions": {"champion": v}, "failures": (failed_versions or {}).get(name, {})}
                     for name, v in held.items()}}


def test_status_per_model_says_which_replicas_hold_it_at_which_version():
    state = _state()
    answer = state.record(_beat("r1", {"iris": 3, "wine": 7}), now=1)
    assert answer["targets"]["wine"] == {"champion": 7}  # the heartbeat brings every model's targets
    state.record(_beat("r2", {"iris": 3}, failures={"churn": "refused to load a pickle"}), now=1)
    status = state.status(now=2)
    assert status["max_models_per_replica"] == 2 and sorted(status["replicas"]) == ["r1", "r2"]
    assert status["replicas"]["r1"]["held"] == ["iris", "wine"]
    iris, wine, churn = (status["models"][n] for n in NAMES)
    assert iris["held_by"] == 2 and iris["on_target"] and iris["targets"] == {"champion": 3}
    assert (wine["alias"], wine["held_by"]) == ("prod", 1)
    assert wine["replicas"]["r2"] == {**wine["replicas"]["r2"], "held": False, "versions": {}}
    assert (churn["alias"], churn["version"], churn["held_by"]) == (None, 4, 0)
    assert churn["failures"] == {"r2": {LOAD_FAILURE: "refused to load a pickle"}}
    assert status["failures"] == {"churn": churn["failures"]}
    assert status["on_target"] is True  # no replica holds churn at a wrong version


def test_a_replica_behind_its_model_is_off_target_and_a_silent_replica_drops_out():
    state = _state()
    state.record(_beat("r1", {"iris": 3}), now=0)
    state.record(_beat("r2", {"iris": 2}), now=0)
    assert not state.model_status("iris", now=1)["on_target"] and not state.status(now=1)["on_target"]
    state.record(_beat("r1", {"iris": 3}), now=6)  # r2 has not reported for longer than the horizon
    iris = state.model_status("iris", now=7)
    assert list(iris["replicas"]) == ["r1"] and iris["on_target"]
    assert not state.model_status("iris", now=100)["on_target"]  # no live replica at all


def test_rollout_of_one_model_settles_when_its_holders_moved_or_failed_the_others_do_not_matter():
    state = _state()
    state.record(_beat("r1", {"iris": 3, "wine": 7}), now=0)
    state.record(_beat("r2", {"wine": 7}), now=0)
    state.set_targets("iris", {"champion": 5}, now=1)
    assert not state.settled("iris", now=1)
    assert state.settled("wine", now=1)
    state.record(_beat("r1", {"iris": 5, "wine": 7}), now=2)
    assert state.settled("iris", now=2)  # r2 does not hold iris: nothing to wait for
    state.set_targets("iris", {"champion": 6}, now=3)
    state.record(_beat("r1", {"iris": 5, "wine": 7}, failed_versions={"iris": {"champion:v6": "sha256"}}), now=4)
    assert state.settled("iris", now=4) and not state.model_status("iris", now=4)["on_target"]
    assert state.model_status("iris", now=4)["failures"] == {"r1": {"champion:v6": "sha256"}}
    events = [e["message"] for e in state.events]
    assert "iris: registry moved {'champion': 3} -> {'champion': 5}" in events
    assert "replica r1 answers iris champion with version 5" in events
    assert state.last_good["iris"] == {"champion": 5}


def test_a_registry_error_keeps_the_known_targets_and_shows_and_a_name_not_served_is_refused():
    state = _state()
    state.set_error("iris", "MlflowException: registry down", now=1)
    iris = state.model_status("iris", now=1)
    assert iris["targets"] == {"champion": 3} and iris["failures"]["registry"] == {
        "lookup": "MlflowException: registry down"}
    fresh = FleetState(state.cfgs, max_models_per_replica=2, horizon_s=5)
    fresh.set_error("wine", "NotFound: no alias prod", now=0)
    fresh.record(_beat("r1", {}), now=0)
    assert not fresh.model_status("wine", now=0)["on_target"]  # nothing known: not on target
    with pytest.raises(NotFound, match=r"'nosuch' is not served by this app; it serves \['churn', 'iris', 'wine'\]"):
        state.model_status("nosuch", now=1)


def test_followers_read_the_targets_the_heartbeat_brought_and_ask_the_registry_only_without_them():
    from mlray.serving.multi import FleetLink, LocalWatcher

    cfg = ServeAppConfig.model_validate({"models": [{"name": "iris"}, {"name": "wine"}]})
    asked: list[str] = []

    def resolve(model_cfg: ServeAppConfig) -> dict[str, int | None]:
        asked.append(model_cfg.model)
        return {"champion": 1}

    link = FleetLink(None, replica="r1", node="n1", pid=1)
    link.targets = {"iris": {"champion": 9}}
    link.last_good = {"iris": {"champion": 8}}
    iris, wine = (LocalWatcher(cfg.for_model(e), resolve=resolve, link=link) for e in cfg.entries)
    report = {"replica": "r1", "versions": {}, "failures": {}}

    async def scenario() -> None:
        assert await iris.sync.remote(report) == {"targets": {"champion": 9}, "last_good": {"champion": 8},
                                                  "challenger_weight": None}
        assert (await wine.sync.remote(report))["targets"] == {"champion": 1}  # not in the link yet
        link.targets["iris"] = {"champion": 10}  # the next heartbeat: iris's alias moved
        assert (await iris.sync.remote(report))["targets"] == {"champion": 10}

    asyncio.run(scenario())
    assert asked == ["wine"]


def test_mlray_status_prints_each_model_with_its_holders_and_failures(capsys):
    from mlray.cli.console import print_status

    state = _state()
    state.record(_beat("replica-one-abcdef", {"iris": 3, "wine": 7}), now=0)
    state.record(_beat("replica-two-abcdef", {"iris": 3}, failures={"churn": "refused to load a pickle"}), now=0)
    print_status(state.status(now=0.5))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "3 models, at most 2 per replica, 2 replicas; on target: True"
    assert lines[1] == "iris@champion: registry says champion=v3; held by 2 of 2 replicas; on target: True"
    assert lines[2] == "  replica replica-one-  champion=v3  (seen 0.5 s ago)"
    assert "wine@prod: registry says champion=v7; held by 1 of 2 replicas; on target: True" in lines
    assert "churn/v4: registry says champion=v4; held by 0 of 2 replicas; on target: True" in lines
    assert lines[-1] == "  FAILED load on replica-two-: refused to load a pickle"
    print_status(state.model_status("iris", now=0.5))  # `mlray rollout iris --app APP`
    assert capsys.readouterr().out.splitlines()[0].startswith("iris@champion: registry says champion=v3; held by 2")


def test_a_replica_reports_the_models_it_holds_with_their_versions_not_those_it_let_go():
    from mlray.serving.multi import ModelSet, Slot
    from tests.unit.test_many_models import Loader, _models

    cfg = _models(["iris", "wine", "churn"], max_models_per_replica=2)
    loader = Loader(cfg)
    lru: dict[str, Slot] = {}  # Serve's multiplexing holds the slots; the ModelSet only weakly

    async def open_slot(name: str) -> Slot:
        lru[name] = await loader(name)
        return lru[name]

    async def scenario() -> dict:
        models = ModelSet(cfg, open_slot=open_slot)
        await models.start()  # pre-warms iris and wine (the bound)
        wine = models.recent["wine"]
        wine.task = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        await wine.task  # its follower stopped: Serve evicted it
        return models.held_report()

    held = asyncio.run(scenario())
    assert list(held) == ["iris"] and held["iris"]["versions"] == {"champion": 3} and held["iris"]["failures"] == {}


def _canary_state() -> FleetState:
    """iris with a challenger (a canary of iris alone); wine without."""
    cfg = ServeAppConfig.model_validate({"models": [{"name": "iris", "challenger": {"alias": "challenger"}},
                                                    {"name": "wine"}]})
    state = FleetState({str(e.name): cfg.for_model(e) for e in cfg.entries}, max_models_per_replica=2, horizon_s=5)
    state.set_targets("iris", {"champion": 3, "challenger": 4}, now=0)
    state.set_weight("iris", 0.25, now=0)
    state.set_targets("wine", {"champion": 7}, now=0)
    return state


def _counts(requests: int, errors: int = 0) -> dict:
    return {"requests": requests, "errors": errors, "buckets": [requests] + [0] * 15}


def test_each_model_has_its_own_challenger_weight_and_traffic_summed_over_replicas():
    from mlray.serving.traffic import BOUNDARIES_S

    state = _canary_state()
    width = len(BOUNDARIES_S) + 1

    def held(champion: int, challenger: int, weight: float | None) -> dict:
        counts = {"champion:v3": {**_counts(champion), "buckets": [champion] + [0] * (width - 1)},
                  "challenger:v4": {**_counts(challenger, 1), "buckets": [challenger] + [0] * (width - 1)}}
        return {"versions": {"champion": 3, "challenger": 4}, "failures": {}, "traffic": counts,
                "challenger_weight": weight}

    answer = state.record({"replica": "r1", "held": {"iris": held(90, 10, 0.25), "wine": {
        "versions": {"champion": 7}, "failures": {}}}, "failures": {}}, now=1)
    assert answer["weights"] == {"iris": 0.25}  # the heartbeat brings each model's weight
    state.record({"replica": "r2", "held": {"iris": held(60, 40, 0.5)}, "failures": {}}, now=1)
    iris = state.traffic("iris", now=2)
    assert iris["counts"]["champion:v3"]["requests"] == 150 and iris["counts"]["challenger:v4"]["errors"] == 2
    assert iris["challenger_weight"] == 0.25 and iris["applied_weights"] == {"r1": 0.25, "r2": 0.5}
    assert state.traffic("wine", now=2) == {"counts": {}, "challenger_weight": None, "applied_weights": {"r1": None}}
    assert list(state.traffic("iris", now=9)["applied_weights"]) == []  # both silent past the horizon
    with pytest.raises(NotFound, match="'churn' is not served by this app"):
        state.traffic("churn", now=2)
    state.set_weight("iris", 1.0, now=3)
    assert state.events[-1]["message"] == "iris: challenger weight 0.25 -> 1.0"


def test_a_challenger_belongs_to_one_model_entry_in_a_many_models_app():
    cfg = ServeAppConfig.model_validate({"models": [{"name": "iris", "challenger": {"weight": 0.3}}, {"name": "wine"}]})
    iris, wine = (cfg.for_model(e) for e in cfg.entries)
    assert iris.challenger is not None and iris.challenger.weight == 0.3 and wine.challenger is None
    single = ServeAppConfig.model_validate({"model": "digits", "challenger": {"mode": "shadow"}})
    assert single.for_model(single.entries[0]).challenger == single.challenger  # one model keeps the app's own
    with pytest.raises(ValueError, match="put it under the model's entry"):
        ServeAppConfig.model_validate({"models": [{"name": "iris"}], "challenger": {}})
    with pytest.raises(ValueError, match=r"models\['iris'\].challenger.mode 'shadow'.*needs an app of one model"):
        ServeAppConfig.model_validate({"models": [{"name": "iris", "challenger": {"mode": "shadow"}}]})
    with pytest.raises(ValueError, match=r"models\['iris'\].challenger.alias 'prod' is the model's own alias"):
        ServeAppConfig.model_validate({"models": [{"name": "iris", "alias": "prod", "challenger": {"alias": "prod"}}]})


def test_a_pipeline_canary_needs_its_model_served_with_a_challenger():
    """`mlray pipeline run` deploys its candidate as its model's challenger: in a many-models app the model must
    be served and its entry must have a challenger; the deploy step says which is missing."""
    from mlray.errors import ConfigError
    from mlray.pipeline.steps import require_canary_app

    status = _canary_state().status(now=1)
    require_canary_app(status, app="fleet", alias="challenger", model="iris")
    with pytest.raises(ConfigError, match=r"'fleet' serves 'wine' without a challenger; give its entry"):
        require_canary_app(status, app="fleet", alias="challenger", model="wine")
    with pytest.raises(ConfigError, match=r"'fleet' does not serve 'churn'; it serves \['iris', 'wine'\]"):
        require_canary_app(status, app="fleet", alias="challenger", model="churn")
    with pytest.raises(ConfigError, match="'digits' has no challenger section"):
        require_canary_app({"targets": {"champion": 1}}, app="digits", alias="challenger", model="digits")
    require_canary_app({"targets": {"champion": 1, "challenger": None}}, app="digits", alias="challenger",
                       model="digits")
