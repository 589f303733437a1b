"""Acceptance of the pipeline issue on the real local cluster, under steady client load: a better candidate
becomes champion, and the pipeline killed mid-canary finishes from there without retraining (a, d: one test,
one training); a worse one, the best trial of a Ray Tune sweep (`trainer: tune`), stops at the gate (b); one that
fails on live traffic is rolled back (c)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import DIGITS, deploy_app, register_champions, register_copy
from tests.helpers import SteadyLoad, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
USERPROJECT = ROOT / "tests" / "fixtures" / "userproject"
ROW = [0.0] * 64
POISON = [1e6] + [0.0] * 63  # far outside the training data: the fragile model raises on it
CANARY = {"weights": [0.2, 0.5], "hold_s": 3, "min_requests": 10, "max_hold_s": 90, "poll_s": 0.5,
          # generous latency bounds: two cores shared with training and the load generator
          "max_p99_ratio": 10.0, "p99_slack_s": 0.5, "min_p99_requests": 10}


def _write_pipeline(folder: Path, *, train: dict | None = None, model: dict | None = None,
                    tune: dict | None = None) -> Path:
    """A pipeline of job `pl` (digits); with ``tune``, the job's sweep section and ``trainer: tune``."""
    job = {**DIGITS, "name": "pl", "experiment": "pl", "train": {**DIGITS["train"], **(train or {})}}
    if model:
        job["model"] = model
    if tune:
        job["tune"] = tune
    (folder / "job.yaml").write_text(yaml.safe_dump(job))
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"job": str(folder / "job.yaml"), "experiment": "pl-pipeline",
                                    "trainer": "tune" if tune else "train", "canary": CANARY,
                                    "rollout_timeout_s": 60}))
    return path


@pytest.fixture(scope="module")
def app(trained, serve_port):
    """Model `pl`: version 1 is the baseline, @champion; an app following it with a split challenger."""
    from mlray.registry import promote

    v1 = register_copy("pl", trained)
    promote("pl", version=v1, alias="champion")
    url = deploy_app("pl", {"model": "pl", "follow": {"poll_interval_s": 1.0, "sync_interval_s": 0.5},
                            "challenger": {"mode": "split", "weight": 0.0}}, port=serve_port)
    yield url
    from ray import serve

    serve.delete("pl")


@pytest.fixture(scope="module")
def fleet(app, trained, serve_port):
    """`pl` again, inside a many-models app with its own challenger, next to `pl-other` (no challenger)."""
    from ray import serve

    other = register_champions(["pl-other"], trained)["pl-other"]
    url = deploy_app("plfleet", {"models": [{"name": "pl", "challenger": {"alias": "challenger", "weight": 0.0}},
                                            {"name": "pl-other"}], "max_models_per_replica": 2,
                                 "follow": {"poll_interval_s": 1.0, "sync_interval_s": 0.5}}, port=serve_port)
    yield url, other
    serve.delete("plfleet")


def _champion() -> int:
    from mlray.registry import get_version

    return get_version("pl", alias="champion").version


@pytest.mark.slow
def test_better_candidate_becomes_champion_after_a_kill_mid_canary(app, ray_cluster, tmp_path):
    from mlray.pipeline import load_pipeline, run
    from mlray.pipeline.record import PipelineRecord
    from mlray.registry.tracking import client, experiment_id
    from mlray.training.run import runs_named

    config = _write_pipeline(tmp_path)
    before = _champion()
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    with SteadyLoad(f"{app}/v1/models/pl:predict", row=ROW, threads=2, max_seconds=400, max_requests=200_000,
                    pause_s=0.02) as load:
        wait_for(lambda: load.count() > 20, timeout=60, what="load running")
        process = subprocess.Popen([str(BIN / "mlray"), "pipeline", "run", "--config", str(config), "--id", "kill"],
                                   env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            def one_weight_held() -> bool:
                if process.poll() is not None:  # pytest.fail is no Exception: wait_for does not retry it
                    pytest.fail(f"the pipeline exited {process.returncode}:\n{process.communicate()[0][-3000:]}")
                found = PipelineRecord.find("kill", experiment="pl-pipeline")
                watch = found.steps.get("watch") if found else None
                return bool(watch and watch.status == "running" and len(watch.outputs.get("stages", [])) == 1)

            wait_for(one_weight_held, timeout=300, interval=0.2, what="the first canary weight held")
        finally:
            process.send_signal(signal.SIGKILL)
            output = process.communicate()[0]
        assert "train: registered pl version" in output, output[-3000:]
        assert _champion() == before  # killed mid-canary: nothing promoted

        result = run(load_pipeline(config), pipeline_id="kill")
        wait_for(lambda: load.versions()[-1] == str(result.steps["train"].outputs["version"]), timeout=30,
                 what="answers from the new champion")
    assert result.resumed and result.outcome == "champion", result.reason
    candidate = int(result.steps["train"].outputs["version"])
    assert _champion() == candidate
    starts = {name: step.starts for name, step in result.steps.items()}
    assert starts["train"] == 1 and starts["deploy"] == 1 and starts["watch"] == 2, starts
    assert len(runs_named(experiment_id("pl"), "pipeline-kill")) == 1  # trained once
    stages = result.steps["watch"].outputs["stages"]
    assert [s["weight"] for s in stages] == [0.2, 0.5] and all(s["challenger"]["errors"] == 0 for s in stages)
    assert load.failures() == [], load.failures()[:5]
    roles = {(version, role) for _, version, role in load.results}
    assert (str(candidate), "challenger") in roles and (str(candidate), "champion") in roles

    # Lineage: the version names its training run, data, commit and this pipeline run.
    from mlray.pipeline.lineage import lineage

    chain = lineage("pl", alias="champion")
    assert chain["pipeline"]["id"] == "kill" and chain["pipeline"]["outcome"] == "champion"
    assert chain["training_run"]["run_id"] == result.steps["train"].outputs["run_id"]
    assert chain["data"]["fingerprint"] and chain["code"]["git_commit"]
    decisions = [v for k, v in client().get_run(result.run_id).data.tags.items()
                 if k.startswith("mlray.pipeline.decision.")]
    assert len(decisions) == 2 and all(d.startswith("advance: challenger within bounds") for d in decisions)
    import requests

    meta = requests.get(f"{app}/v1/models/pl", timeout=10).json()
    assert meta["version"] == candidate and meta["lineage"]["mlray.pipeline.id"] == "kill"


@pytest.mark.slow
def test_worse_candidate_from_a_tune_sweep_stops_at_the_gate_and_serving_is_untouched(app, tmp_path):
    """`trainer: tune` on the cluster: a 2-trial sweep of 1-epoch trainings registers its best trial, which
    is worse than the 10-epoch champion, so the gate refuses it."""
    import requests

    from mlray.pipeline import load_pipeline, run
    from mlray.registry import get_version
    from mlray.registry.tracking import client
    from mlray.serving.deploy import app_status

    champion = _champion()
    sweep = {"num_samples": 1, "scheduler": {"type": "fifo"},  # a grid of 2: 2 trials
             "search_space": {"train.lr": {"grid": [0.001, 0.003]}}}
    result = run(load_pipeline(_write_pipeline(tmp_path, train={"epochs": 1}, tune=sweep)), pipeline_id="worse")
    assert result.outcome == "refused" and "is not better than" in result.reason, result.reason
    assert _champion() == champion
    assert [n for n, s in result.steps.items() if s.status == "skipped"] == [
        "register", "compress", "deploy", "watch", "finish"]
    trained = result.steps["train"].outputs
    assert trained["sweep"] == "pipeline-worse" and trained["best_config"]["train.lr"] in (0.001, 0.003), trained
    # the version registered is the sweep's best trial: the best val_accuracy of the sweep's 2 trial runs
    best = client().get_run(trained["run_id"])
    swept = client().search_runs([best.info.experiment_id], "tags.`mlray.sweep_name` = 'pipeline-worse'")
    trials = [run for run in swept if "mlray.trial_id" in run.data.tags]
    scores = {run.info.run_id: run.data.metrics["val_accuracy"] for run in trials if "val_accuracy" in run.data.metrics}
    assert len(scores) == 2 and max(scores, key=scores.__getitem__) == trained["run_id"], scores
    worse = get_version("pl", version=int(trained["version"]))
    assert worse.run_id == trained["run_id"]
    assert worse.aliases == [] and "is not better than" in worse.tags["mlray.pipeline.gate"]
    status = app_status("pl")
    assert status["targets"] == {"champion": champion, "challenger": None}
    answer = requests.post(f"{app}/v1/models/pl:predict", json={"instances": [ROW]}, timeout=10)
    assert answer.headers["x-model-version"] == str(champion)


def test_candidate_failing_on_live_traffic_is_rolled_back(app, tmp_path, monkeypatch):
    from mlray.pipeline import load_pipeline, run
    from mlray.registry import get_version
    from mlray.serving.deploy import app_status

    monkeypatch.syspath_prepend(str(USERPROJECT))
    champion = _champion()
    model = {"factory": "usermodel.nets:fragile_mlp", "kwargs": {"hidden": [128, 64], "dropout": 0.1}}
    config = _write_pipeline(tmp_path, model=model)
    with SteadyLoad(f"{app}/v1/models/pl:predict", row=POISON, threads=2, retry_on_500=True,
                    max_seconds=400, max_requests=200_000, pause_s=0.02) as load:
        result = run(load_pipeline(config), pipeline_id="fragile")
    assert result.outcome == "rolled_back" and "error rate" in result.reason, result.reason
    assert result.steps["gate"].outputs["passed"]  # it passed every offline check
    assert result.steps["watch"].outputs["failed_stage"]["weight"] == 0.2  # at the first weight
    assert _champion() == champion
    fragile = get_version("pl", version=int(result.steps["train"].outputs["version"]))
    assert fragile.aliases == [] and not any(k.startswith("mlray.promotion.champion") for k in fragile.tags)
    assert "error rate" in fragile.tags["mlray.pipeline.rolled_back"]
    assert load.failures() == [] and load.retries > 0, (load.failures()[:5], load.retries)
    assert app_status("pl")["targets"]["challenger"] is None


def test_candidate_whose_compressed_variant_loses_accuracy_ships_uncompressed_in_a_many_models_app(fleet, tmp_path):
    """The canary of one model of a many-models app: its entry's challenger takes the candidate, the weights
    split that model's requests only, and the other model answers its one version throughout."""
    from mlray.pipeline import load_pipeline, parse_pipeline, run
    from mlray.registry import get_version

    url, other = fleet
    path = _write_pipeline(tmp_path)
    raw = yaml.safe_load(path.read_text())
    # No accuracy may be lost, and 95 % of the weights are pruned: the variant cannot keep it.
    raw["compress"] = {"enabled": True, "method": "prune", "sparsity": 0.95, "tolerance": 0.0}
    raw["app"] = "plfleet"
    cfg = parse_pipeline(raw)
    assert cfg.compress.enabled and load_pipeline(path).compress.enabled is False
    with SteadyLoad(f"{url}/v1/models/pl:predict", row=ROW, threads=2, max_seconds=400, max_requests=200_000,
                    pause_s=0.02) as load, \
            SteadyLoad(f"{url}/v1/models/pl-other:predict", row=ROW, threads=1, max_seconds=400,
                       max_requests=200_000, pause_s=0.05) as bystander:
        result = run(cfg, pipeline_id="compress-refused")
    compressed = result.steps["compress"].outputs
    assert compressed["compressed"] is False and compressed["reason"], compressed
    candidate = int(result.steps["train"].outputs["version"])
    assert compressed["served_version"] == candidate  # the original shipped
    assert result.outcome == "champion" and get_version("pl", alias="champion").version == candidate, result.reason
    stages = result.steps["watch"].outputs["stages"]
    assert [s["weight"] for s in stages] == [0.2, 0.5] and all(s["challenger"]["requests"] > 0 for s in stages)
    assert load.failures() == [] and bystander.failures() == [], (load.failures()[:5], bystander.failures()[:5])
    assert (str(candidate), "challenger") in {(version, role) for _, version, role in load.results}
    assert {version for _, version, _ in bystander.results} == {str(other)}  # pl-other: untouched
