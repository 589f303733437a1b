"""Acceptance (a) and (b) of the serving issue: following the registry under load, a broken version that
never takes traffic, rollback; a 90/10 champion/challenger split, sticky keys, and shadow mode."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import deploy_app, register_copy
from tests.helpers import SteadyLoad, wait_for

pytestmark = pytest.mark.integration

ROW = [0.0] * 64
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def mlray_cli(*args: str, address: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_ADDRESS": address}
    return subprocess.run([str(BIN / "mlray"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def following(trained, serve_port):
    """Model `ro`: v1 and v2 good (same weights), v3 broken; an app following ro@champion."""
    from mlray.registry import promote

    v1, v2, v3 = (register_copy("ro", trained), register_copy("ro", trained), register_copy("ro", trained, broken=True))
    promote("ro", version=v1, alias="champion")
    url = deploy_app("ro", {"model": "ro", "follow": {"poll_interval_s": 1.0, "sync_interval_s": 0.5}}, port=serve_port)
    yield url, (v1, v2, v3)
    from ray import serve

    serve.delete("ro")


def test_alias_moves_under_load_without_a_failed_request(following, ray_cluster):
    from mlray.registry import promote
    from mlray.serving.deploy import app_status, rollout

    url, (v1, v2, v3) = following
    predict = f"{url}/v1/models/ro:predict"
    with SteadyLoad(predict, row=ROW, threads=8) as load:  # the serving issue's 8 keep-alive clients, no retries
        wait_for(lambda: load.count() > 50, timeout=60, what="load running")
        promote("ro", version=v2, alias="champion", force=True, reason="test: next version")
        status = rollout("ro", timeout_s=60)  # `mlray rollout`: act now, not at the next poll
        assert status["on_target"] and status["targets"]["champion"] == v2, status
        assert all(r["versions"]["champion"] == v2 for r in status["replicas"].values())
        wait_for(lambda: load.versions()[-1] == str(v2), timeout=30, what="answers from the new version")

        # A version whose files do not match their hash: it must never answer, v2 keeps serving.
        promote("ro", version=v3, alias="champion", force=True, reason="test: broken upload")
        status = rollout("ro", timeout_s=60)
        assert not status["on_target"] and status["targets"]["champion"] == v3
        failures = [e for r in status["replicas"].values() for k, e in r["failures"].items() if k == f"champion:v{v3}"]
        assert failures and "sha256" in failures[0], status
        count = load.count()
        wait_for(lambda: load.count() > count + 100, timeout=60, what="more traffic while v3 is the alias")

        # `mlray status` shows the failure; `mlray rollback` moves the alias back and the app follows.
        shown = mlray_cli("status", "ro", address=ray_cluster.address)
        assert shown.returncode == 0, shown.stderr
        assert f"FAILED champion:v{v3}" in shown.stdout and "on target: False" in shown.stdout
        rolled = mlray_cli("rollback", "ro", address=ray_cluster.address)
        assert rolled.returncode == 0, rolled.stderr
        assert f"ro@champion -> version {v2} (was {v3})" in rolled.stdout
        assert app_status("ro")["on_target"] is True
    assert load.failures() == [], load.failures()[:5]
    # Each client moved from v1 to v2 once and never back; v3 never answered. (Across threads a request
    # answered by v1 just before the swap can be recorded after another thread's first v2.)
    assert load.versions_by_thread() == [[str(v1), str(v2)]] * 8, load.versions_by_thread()
    assert load.count() > 300


def test_polling_alone_follows_the_alias(following):
    from mlray.registry import promote

    url, (v1, _, _) = following
    promote("ro", version=v1, alias="champion", force=True, reason="test: polling")

    def version() -> str:
        return requests.post(f"{url}/v1/models/ro:predict", json={"instances": [ROW]}, timeout=10).headers[
            "x-model-version"]

    wait_for(lambda: version() == str(v1), timeout=30, what="the app following the alias by polling")


@pytest.fixture(scope="module")
def challenger_apps(trained, serve_port):
    from mlray.registry import promote

    champion, challenger = register_copy("ab", trained), register_copy("ab", trained)
    promote("ab", version=champion, alias="champion")
    promote("ab", version=challenger, alias="challenger")
    split = deploy_app("ab", {"model": "ab", "challenger": {"mode": "split", "weight": 0.1}}, port=serve_port)
    shadow = deploy_app("ab-shadow", {"model": "ab", "challenger": {"mode": "shadow"}}, port=serve_port)
    yield split, shadow, champion, challenger
    from ray import serve

    serve.delete("ab")
    serve.delete("ab-shadow")


def test_weighted_split_lands_within_five_points(challenger_apps):
    split, _, champion, challenger = challenger_apps

    def one(_: int) -> tuple[str, str]:
        r = requests.post(f"{split}/v1/models/ab:predict", json={"instances": [ROW]}, timeout=30)
        assert r.status_code == 200, r.text
        return r.headers["x-model-role"], r.headers["x-model-version"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(1000)))
    roles = Counter(role for role, _ in answers)
    assert 0.05 <= roles["challenger"] / 1000 <= 0.15, roles
    assert {v for r, v in answers if r == "challenger"} == {str(challenger)}
    assert {v for r, v in answers if r == "champion"} == {str(champion)}

    # The same request key always lands on the same side.
    for key in ("user-1", "user-2", "user-3", "user-4"):
        sides = {requests.post(f"{split}/v1/models/ab:predict", json={"instances": [ROW]}, timeout=30,
                               headers={"x-mlray-key": key}).headers["x-model-role"] for _ in range(10)}
        assert len(sides) == 1, (key, sides)


def test_shadow_answers_are_recorded_not_returned(challenger_apps):
    from mlray.serving.deploy import app_status, shadow_records

    _, shadow, champion, challenger = challenger_apps
    before = app_status("ab-shadow")["shadow"]["compared"]
    for _ in range(40):
        r = requests.post(f"{shadow}/v1/models/ab:predict", json={"instances": [ROW, ROW]}, timeout=30)
        assert r.status_code == 200
        assert r.headers["x-model-role"] == "champion" and r.headers["x-model-version"] == str(champion)
        assert r.json()["model_version"] == champion
    status = wait_for(lambda: (s := app_status("ab-shadow"))["shadow"]["compared"] >= before + 40 and s,
                      timeout=30, what="40 shadow comparisons recorded")
    assert status["shadow"]["agreed"] == status["shadow"]["compared"]  # same weights: they must agree

    records = shadow_records("ab-shadow", 40)
    assert len(records) == 40
    assert all(r["challenger_version"] == challenger and r["champion_version"] == champion for r in records)
    assert all(r["rows"] == 2 and r["max_abs_diff"] == 0.0 for r in records)
