"""Operating a many-models app: ``mlray status APP`` shows each model's registry targets and which replicas
hold it at which version; ``mlray rollout NAME --app APP`` makes the replicas holding NAME follow its moved
alias now (the other models keep their versions); a name the app does not serve is a clear error; a model's
own challenger splits that model's requests only, at the weight the registry sets, counted per version."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import requests

from tests.conftest import deploy_app, register_champions, register_copy, set_alias
from tests.integration.test_serving_rollout import ROW, mlray_cli

pytestmark = pytest.mark.integration

NAMES = ["ops-a", "ops-b", "ops-c"]


@pytest.fixture(scope="module")
def fleet(trained, serve_port):
    from ray import serve

    first = register_champions(NAMES, trained)
    # a long poll: only `mlray rollout` makes the app notice a moved alias within this test
    # ops-b has a challenger of its own (no @challenger yet: champion only), for the canary test below
    entries = [{"name": n, **({"challenger": {"alias": "challenger", "weight": 0.0}} if n == "ops-b" else {})}
               for n in NAMES]
    url = deploy_app("ops", {"models": entries, "max_models_per_replica": 2,
                             "follow": {"poll_interval_s": 600.0, "sync_interval_s": 0.5}},
                     port=serve_port, options={"num_replicas": 2})
    yield url, first
    serve.delete("ops")


def _version(url: str, name: str) -> str:
    answer = requests.post(f"{url}/v1/models/{name}:predict", json={"instances": [ROW]}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.headers["x-model-version"]


def test_status_per_model_and_rollout_of_one_moved_alias(fleet, trained, ray_cluster):
    from tests.helpers import wait_for

    url, first = fleet
    address = ray_cluster.address

    def status() -> dict:
        shown = mlray_cli("status", "ops", "--json", address=address)
        assert shown.returncode == 0, (shown.stdout, shown.stderr)
        return json.loads(shown.stdout)

    # each replica pre-warms the first two models (its bound); the third is held by none until asked for
    now = wait_for(lambda: (s := status()) and len(s["replicas"]) == 2 and s, timeout=60, what="2 replicas report")
    assert set(now["models"]) == set(NAMES) and now["max_models_per_replica"] == 2, now
    for name in NAMES[:2]:
        model = now["models"][name]
        assert model["targets"] == {"champion": first[name], **({"challenger": None} if name == "ops-b" else {})}, model
        assert [r["held"] for r in model["replicas"].values()] == [True, True], model
        assert all(r["versions"] == {"champion": first[name]} for r in model["replicas"].values()), model
    assert not any(r["held"] for r in now["models"]["ops-c"]["replicas"].values()), now["models"]["ops-c"]
    assert now["on_target"] is True and now["failures"] == {}, now
    text = mlray_cli("status", "ops", address=address)
    assert text.returncode == 0, text.stderr
    assert f"ops-a@champion: registry says champion=v{first['ops-a']}" in text.stdout, text.stdout
    assert "ops-c@champion" in text.stdout and "held by 0 of 2 replicas" in text.stdout, text.stdout
    print("$ mlray status ops", text.stdout, sep="\n")  # docs/any-model.md shows this (pytest -s)

    # ops-a's alias moves; the app does not poll within the test, so it keeps answering the old version ...
    moved = register_copy("ops-a", trained)
    set_alias("ops-a", moved)
    assert _version(url, "ops-a") == str(first["ops-a"])
    # ... until `mlray rollout ops-a --app ops`, which waits for every replica holding it
    rolled = mlray_cli("rollout", "ops-a", "--app", "ops", "--json", address=address)
    assert rolled.returncode == 0, (rolled.stdout, rolled.stderr)
    report = json.loads(rolled.stdout)
    assert report["model"] == "ops-a" and report["targets"] == {"champion": moved} and report["on_target"], report
    held = [r for r in report["replicas"].values() if r["held"]]
    assert len(held) == 2 and all(r["versions"] == {"champion": moved} for r in held), report
    assert _version(url, "ops-a") == str(moved)
    again = mlray_cli("rollout", "ops-a", "--app", "ops", address=address)  # settled already: returns at once
    assert again.returncode == 0 and f"ops-a@champion: registry says champion=v{moved}; held by 2 of 2" in again.stdout
    print("$ mlray rollout ops-a --app ops", again.stdout, sep="\n")
    # a replica's status route answers the model's status from the app's watcher
    route = requests.get(f"{url}/v1/models/ops-a/status", timeout=30).json()
    assert route["model"] == "ops-a" and route["held_by"] == 2 and route["targets"] == {"champion": moved}, route
    after = status()
    assert after["models"]["ops-b"]["targets"] == {"champion": first["ops-b"], "challenger": None}
    assert all(r["versions"] == {"champion": first["ops-b"]}
               for r in after["models"]["ops-b"]["replicas"].values() if r["held"]), after["models"]["ops-b"]
    assert _version(url, "ops-b") == str(first["ops-b"])
    print("$ mlray status ops  # after the rollout", mlray_cli("status", "ops", address=address).stdout, sep="\n")

    # a name the app does not serve: exit 1, naming it and the app's models
    wrong = mlray_cli("rollout", "nosuch", "--app", "ops", address=address)
    assert wrong.returncode == 1, (wrong.stdout, wrong.stderr)
    assert "'nosuch'" in wrong.stderr and "ops-a" in wrong.stderr, wrong.stderr
    print("$ mlray rollout nosuch --app ops", wrong.stderr, sep="\n")


def test_a_challenger_of_one_model_splits_that_models_requests_only(fleet, trained):
    """What the pipeline's canary does to one model of a many-models app: a candidate becomes ops-b@challenger
    and the registry says its weight; the replicas holding ops-b load it beside the champion and split ops-b's
    requests, ops-a keeps answering one version, and the app's watcher counts ops-b's requests per version."""
    from mlray import registry
    from mlray.serving.deploy import rollout, traffic
    from mlray.serving.traffic import window
    from tests.helpers import wait_for

    url, first = fleet
    champion, candidate = first["ops-b"], register_copy("ops-b", trained)
    registry.set_challenger_weight("ops-b", 0.5)
    set_alias("ops-b", candidate, alias="challenger")
    status = rollout("ops", model="ops-b", timeout_s=60)
    held = [r for r in status["replicas"].values() if r["held"]]
    assert held and all(r["versions"] == {"champion": champion, "challenger": candidate} for r in held), status
    wait_for(lambda: (applied := traffic("ops", "ops-b")["applied_weights"]) and set(applied.values()) == {0.5},
             timeout=30, what="every replica holding ops-b applies weight 0.5")

    before = traffic("ops", "ops-b")["counts"]
    answered = Counter(_version(url, "ops-b") for _ in range(80))
    assert set(answered) == {str(champion), str(candidate)} and min(answered.values()) >= 20, answered
    assert len({_version(url, "ops-a") for _ in range(10)}) == 1  # ops-a has no challenger: one version

    def counted() -> tuple[int, int]:
        after = traffic("ops", "ops-b")["counts"]
        return (window(before, after, f"champion:v{champion}").requests,
                window(before, after, f"challenger:v{candidate}").requests)

    wait_for(lambda: counted() == (answered[str(champion)], answered[str(candidate)]), timeout=30,
             what=f"the watcher's counts of ops-b {counted()} reach what was answered {dict(answered)}")
    assert traffic("ops", "ops-c")["counts"] == {}  # no challenger: its replicas report no per-version counts
