"""The pipeline without Ray: its config, plan, canary decisions, traffic figures, and resume on a real MLflow
store (the steps that need Ray replaced by recording functions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlray.errors import ConfigError
from mlray.pipeline import load_pipeline, parse_pipeline, plan
from mlray.pipeline.canary import CanaryPolicy
from mlray.pipeline.config import CanaryStep
from mlray.serving.traffic import BOUNDARIES_S, TrafficCounter, Window, merge, quantile, window

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLRAY_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


# -- config and plan ------------------------------------------------------------------------------------------

def test_shipped_config_loads_and_plans_every_step_in_order():
    cfg = load_pipeline(ROOT / "configs/pipeline.yaml")
    assert cfg.compress.enabled is False  # optional, off by default
    steps = plan(cfg, pipeline_id="p1")
    assert [name for name, _ in steps] == ["train", "evaluate", "gate", "register", "compress", "deploy", "watch",
                                           "finish"]
    described = dict(steps)
    assert "train.run_name pipeline-p1" in described["train"]
    assert "test_accuracy (maximize" in described["gate"]
    assert described["compress"].startswith("skipped")
    assert "weights 0.05, 0.25, 0.5" in described["watch"]


@pytest.mark.parametrize(("raw", "message"), [
    ({"canary": {"wieghts": [0.1]}}, r"canary\.wieghts: Extra inputs are not permitted \(got \[0\.1\]\)"),
    ({"canary": {"weights": [0.5, 0.25]}}, r"canary\.weights.*must rise strictly within \(0, 1\], got \[0\.5, 0\.25\]"),
    ({"canary": {"weights": [0.0, 0.5]}}, r"must rise strictly"),
    ({"canary": {"hold_s": 60, "max_hold_s": 30}}, r"canary\.max_hold_s \(30\.0\) is shorter than canary\.hold_s"),
    ({"compress": {"sparsity": 1.5}}, r"compress\.sparsity: Input should be less than 1 \(got 1\.5\)"),
    ({"gate": {"direction": "up"}}, r"gate\.direction: Input should be 'maximize' or 'minimize' \(got 'up'\)"),
])
def test_config_errors_name_the_field_and_value(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_pipeline(raw, origin="in test.yaml")


def test_trainer_tune_plans_a_sweep_and_needs_a_tune_section():
    tuned = parse_pipeline({"job": str(ROOT / "configs/digits-tune.yaml"), "trainer": "tune"})
    assert "tune.sweep_name pipeline-t (registers the best trial)" in dict(plan(tuned, pipeline_id="t"))["train"]
    with pytest.raises(ConfigError, match=r"trainer 'tune' needs a tune section in the job config .*digits\.yaml"):
        plan(parse_pipeline({"job": str(ROOT / "configs/digits.yaml"), "trainer": "tune"}), pipeline_id="t")


def test_relative_job_path_falls_back_to_the_yaml_folder(tmp_path):
    (tmp_path / "job.yaml").write_text("name: elsewhere\n")
    (tmp_path / "pipeline.yaml").write_text("job: job.yaml\noverrides: {train.epochs: 3}\n")
    cfg = load_pipeline(tmp_path / "pipeline.yaml")
    assert cfg.job == str(tmp_path / "job.yaml")
    assert "elsewhere, 3 epochs" in dict(plan(cfg, pipeline_id="x"))["train"]


# -- traffic figures and the canary's decision ----------------------------------------------------------------

def test_window_is_the_difference_of_two_snapshots_and_p99_its_bucket_bound():
    counter = TrafficCounter()
    for _ in range(50):
        counter.record(0.002, ok=True)
    before = {"challenger:v2": counter.to_dict()}
    for _ in range(98):
        counter.record(0.002, ok=True)
    counter.record(0.3, ok=False)
    counter.record(0.3, ok=False)
    after = merge([{"challenger:v2": counter.to_dict()}, {}])
    got = window(before, after, "challenger:v2")
    assert (got.requests, got.errors) == (100, 2)
    assert got.p99_s is not None and 0.3 <= got.p99_s < 0.3 * 1.5  # 2 % of requests took 0.3 s
    assert window(before, after, "champion:v1") == Window(0, 0, None)
    assert quantile([0] * len(BOUNDARIES_S) + [3], 0.5) == 2 * BOUNDARIES_S[-1]  # the overflow bucket


def test_merge_sums_replicas():
    a, b = TrafficCounter(), TrafficCounter()
    a.record(0.01, ok=True)
    b.record(0.01, ok=False)
    total = merge([{"champion:v1": a.to_dict()}, {"champion:v1": b.to_dict()}])["champion:v1"]
    assert (total["requests"], total["errors"], sum(total["buckets"])) == (2, 1, 2)


POLICY = CanaryPolicy(CanaryStep(weights=(0.05, 0.25, 0.5), hold_s=10, max_hold_s=30, min_requests=20,
                                 max_error_rate_increase=0.01, max_p99_ratio=2.0, p99_slack_s=0.01))
GOOD = Window(requests=400, errors=0, p99_s=0.02)


def test_canary_rolls_back_on_errors_at_once_even_before_the_hold_ends():
    decision = POLICY.decide(weight=0.05, champion=GOOD, challenger=Window(5, 2, 0.02), held_s=1)
    assert decision.action == "rollback"
    assert "error rate 0.4000 (2/5) exceeds the champion's 0.0000 + 0.01 at weight 0.05" in decision.reason
    assert decision.figures["challenger"]["errors"] == 2


def test_canary_tolerates_errors_within_the_bound():
    decision = POLICY.decide(weight=0.25, champion=Window(1000, 10, 0.02), challenger=Window(100, 1, 0.02),
                             held_s=12)
    assert decision.action == "advance", decision.reason


def test_canary_compares_p99s_only_from_min_p99_requests_a_side():
    # 33 requests: the p99 is the slowest one; a single pause of the machine must not roll a challenger back
    one_slow = Window(requests=33, errors=0, p99_s=0.065)
    decision = POLICY.decide(weight=0.05, champion=GOOD, challenger=one_slow, held_s=1)
    assert decision.action == "hold", decision.reason
    advance = POLICY.decide(weight=0.05, champion=GOOD, challenger=one_slow, held_s=12)
    assert advance.action == "advance" and "p99s not compared: fewer than 100 requests" in advance.reason
    decision = POLICY.decide(weight=0.05, champion=GOOD, challenger=Window(150, 0, 0.5), held_s=1)
    assert decision.action == "rollback"
    assert "p99 500.0 ms exceeds 2 x the champion's 20.0 ms + 10 ms at weight 0.05" in decision.reason
    # nor from a champion's few requests (a low p99 of a handful would tighten the bound by chance)
    few = Window(requests=40, errors=0, p99_s=0.001)
    assert POLICY.decide(weight=0.05, champion=few, challenger=Window(150, 0, 0.03), held_s=1).action == "hold"


def test_canary_promotes_only_with_the_p99s_compared():
    last, unjudged = 0.5, Window(requests=60, errors=0, p99_s=0.02)
    held = POLICY.decide(weight=last, champion=GOOD, challenger=unjudged, held_s=12)
    assert held.action == "hold" and "promotion needs the p99s compared: 60 challenger" in held.reason
    starved = POLICY.decide(weight=last, champion=GOOD, challenger=unjudged, held_s=30)
    assert starved.action == "rollback" and "not enough traffic to judge" in starved.reason
    assert POLICY.decide(weight=last, champion=GOOD, challenger=Window(120, 0, 0.02), held_s=12).action == "advance"


def test_canary_holds_then_advances_and_gives_up_without_traffic():
    assert POLICY.decide(weight=0.05, champion=GOOD, challenger=Window(30, 0, 0.02), held_s=3).action == "hold"
    advance = POLICY.decide(weight=0.05, champion=GOOD, challenger=Window(30, 0, 0.025), held_s=10)
    assert advance.action == "advance" and "30 requests" in advance.reason
    assert POLICY.decide(weight=0.05, champion=GOOD, challenger=Window(3, 0, 0.02), held_s=20).action == "hold"
    starved = POLICY.decide(weight=0.05, champion=GOOD, challenger=Window(3, 0, 0.02), held_s=30)
    assert starved.action == "rollback" and "not enough traffic" in starved.reason


# -- the runner: record, resume, stop -------------------------------------------------------------------------

class Killed(BaseException):
    """Stands for the process being killed: not an Exception, so nothing is cleaned up."""


def _fake_steps(calls: list[str], *, kill_in: str | None = None, gate_passes: bool = True):
    from mlray.pipeline.steps import StepResult

    def make(name: str):
        def step(ctx):
            calls.append(name)
            if name == kill_in and calls.count(name) == 1:
                ctx.record.progress(name, {"stages": [{"weight": 0.05}]})
                raise Killed()
            if name == "train":
                return StepResult({"version": 7})
            if name == "gate" and not gate_passes:
                return StepResult({"passed": False}, stop=("refused", "worse"))
            if name == "watch":
                return StepResult({"decision": "promote", "resumed_from": ctx.out("watch").get("stages")})
            if name == "finish":
                return StepResult({"outcome": "champion"}, stop=("champion", "within bounds"))
            return StepResult({"seen_version": ctx.out("train")["version"]})
        return step

    from mlray.pipeline.runner import STEPS

    return {name: make(name) for name in STEPS}


def test_a_killed_pipeline_resumes_where_it_stopped_and_runs_no_step_twice(store):
    from mlray.pipeline.record import PipelineRecord
    from mlray.pipeline.runner import run
    from mlray.registry.tracking import client

    cfg = load_pipeline(ROOT / "configs/pipeline.yaml")
    calls: list[str] = []
    with pytest.raises(Killed):
        run(cfg, pipeline_id="p-kill", step_fns=_fake_steps(calls, kill_in="watch"))
    assert calls == ["train", "evaluate", "gate", "register", "compress", "deploy", "watch"]

    calls.clear()
    result = run(cfg, pipeline_id="p-kill", step_fns=_fake_steps(calls))
    assert result.resumed and result.outcome == "champion"
    assert calls == ["watch", "finish"]  # nothing before the interrupted step ran again
    starts = {name: s.starts for name, s in result.steps.items()}
    assert starts == {"train": 1, "evaluate": 1, "gate": 1, "register": 1, "compress": 1, "deploy": 1, "watch": 2,
                      "finish": 1}
    assert result.steps["watch"].outputs["resumed_from"] == [{"weight": 0.05}]  # its progress survived the kill

    # What a new process reads back from MLflow alone: one parent run, every step done, the outcome.
    found = PipelineRecord.find("p-kill", experiment=cfg.experiment)
    assert found is not None and found.run_id == result.run_id
    assert {name: s.status for name, s in found.steps.items()} == dict.fromkeys(starts, "done")
    run_info = client().get_run(result.run_id)
    assert run_info.info.status == "FINISHED" and run_info.data.tags["mlray.pipeline.outcome"] == "champion"
    assert json.loads(run_info.data.tags["mlray.pipeline.step.train"])["outputs"] == {"version": 7}
    assert run_info.data.params["pipeline.canary.hold_s"] == "30.0"

    calls.clear()
    again = run(cfg, pipeline_id="p-kill", step_fns=_fake_steps(calls))
    assert calls == [] and again.outcome == "champion"  # an ended pipeline runs nothing


def test_a_refused_gate_ends_the_pipeline_and_skips_the_rest(store):
    from mlray.pipeline.runner import run

    calls: list[str] = []
    result = run(load_pipeline(ROOT / "configs/pipeline.yaml"), pipeline_id="p-gate",
                 step_fns=_fake_steps(calls, gate_passes=False))
    assert result.outcome == "refused" and result.reason == "worse"
    assert calls == ["train", "evaluate", "gate"]
    assert {n: s.status for n, s in result.steps.items() if s.status == "skipped"}.keys() == {
        "register", "compress", "deploy", "watch", "finish"}


def test_a_run_killed_after_the_gate_refused_still_ends_there(store):
    from mlray.pipeline.runner import run
    from mlray.registry.tracking import client

    calls: list[str] = []
    fns = _fake_steps(calls, gate_passes=False)
    cfg = load_pipeline(ROOT / "configs/pipeline.yaml")
    first = run(cfg, pipeline_id="p-gate-kill", step_fns=fns)
    # The record as a kill right after the gate's refusal leaves it: no later step, no outcome.
    for key in ["mlray.pipeline.outcome"] + [f"mlray.pipeline.step.{n}" for n in
                                             ("register", "compress", "deploy", "watch", "finish")]:
        client().delete_tag(first.run_id, key)
    calls.clear()
    result = run(cfg, pipeline_id="p-gate-kill", step_fns=fns)
    assert result.resumed and result.outcome == "refused" and calls == []  # nothing after the refusal runs
    assert result.steps["register"].status == "skipped"


def test_a_failed_step_is_retried_by_the_same_id(store):
    from mlray.pipeline.runner import run

    calls: list[str] = []
    fns = _fake_steps(calls)
    original = fns["deploy"]

    def flaky(ctx):
        if calls.count("deploy-failed") == 0:
            calls.append("deploy-failed")
            raise ConfigError("the app has no challenger section")
        return original(ctx)

    cfg = load_pipeline(ROOT / "configs/pipeline.yaml")
    with pytest.raises(ConfigError):
        run(cfg, pipeline_id="p-flaky", step_fns={**fns, "deploy": flaky})
    result = run(cfg, pipeline_id="p-flaky", step_fns={**fns, "deploy": flaky})
    assert result.outcome == "champion" and calls.count("train") == 1
    assert result.steps["deploy"].starts == 2 and result.steps["deploy"].error is None


# -- registry weight, serving's use of it, lineage ------------------------------------------------------------

def test_challenger_weight_round_trips_through_the_registry(store):
    from mlray.registry import challenger_weight, register, set_challenger_weight
    from mlray.registry.tracking import client, experiment_id

    run = client().create_run(experiment_id("w"))
    register("w", model_uri=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags={})
    assert challenger_weight("w") is None
    set_challenger_weight("w", 0.25)
    assert challenger_weight("w") == 0.25
    set_challenger_weight("w", None)
    assert challenger_weight("w") is None
    with pytest.raises(ConfigError, match=r"within \[0, 1\], got 1\.5"):
        set_challenger_weight("w", 1.5)
    assert challenger_weight("nope") is None


def test_core_uses_the_live_weight_and_counts_each_role():
    import asyncio

    from mlray.serving import routes
    from mlray.serving.config import ServeAppConfig
    from mlray.serving.core import Call, PredictionCore
    from tests.unit.serving_app import FEATURES, Versions, served_model

    versions = Versions({"champion": served_model(3), "challenger": served_model(4, seed=1)})
    core = PredictionCore(ServeAppConfig.model_validate({"model": "digits", "challenger": {"weight": 0.0}}),
                          versions)
    body = json.dumps({"instances": [[0.0] * len(FEATURES)]}).encode()
    route, params = routes.match("POST", "/v1/models/digits:predict")

    async def read() -> bytes:
        return body

    def roles(n: int) -> set[str]:
        return {asyncio.run(core.answer(Call(route, params, {}, read)))[1]["x-model-role"] for _ in range(n)}

    assert roles(20) == {"champion"}  # the app's static weight: 0
    versions.challenger_weight = 1.0  # what the registry says now wins
    assert roles(20) == {"challenger"}
    assert versions.calls[-1] == ("challenger", 4, True) and len(versions.calls) == 40

    def boom(module, args):
        raise RuntimeError("this version cannot answer")

    versions.models["challenger"].loaded.model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError):
        asyncio.run(core.answer(Call(route, params, {}, read)))
    assert versions.calls[-1] == ("challenger", 4, False)


def test_a_failing_version_fails_only_its_own_requests_in_a_shared_batch():
    import numpy as np

    from mlray.serving.config import ServeAppConfig
    from mlray.serving.core import PredictionCore
    from tests.unit.serving_app import FEATURES, Versions, served_model

    good, bad = served_model(3), served_model(4, seed=1)

    def boom(module, args):
        raise RuntimeError("this version cannot answer")

    bad.loaded.model.register_forward_pre_hook(boom)
    core = PredictionCore(ServeAppConfig.model_validate({"model": "digits"}), Versions({"champion": good}))
    x = np.zeros((1, len(FEATURES)), dtype=np.float32)
    parts = core._predict_batch([(good, x), (bad, x), (good, x)])
    assert isinstance(parts[1], RuntimeError)
    assert parts[0].shape == parts[2].shape == (1, 3)


# -- the commands ---------------------------------------------------------------------------------------------

@pytest.fixture
def cli(store, capsys):
    from mlray.cli import run

    def invoke(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = run(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def test_pipeline_run_names_a_bad_field_in_one_error_line(cli, tmp_path):
    bad = tmp_path / "pipeline.yaml"
    bad.write_text("canary: {hold: 3}\n")
    code, out, err = cli("pipeline", "run", "--config", str(bad), "--dry-run")
    assert code == 1 and out == ""
    assert err.strip().startswith("error: invalid config in ") and "canary.hold: Extra inputs are not permitted" in err


def test_dry_run_json_lists_the_plan(cli):
    code, out, _ = cli("pipeline", "run", "--config", str(ROOT / "configs/pipeline.yaml"), "--dry-run", "--id", "d",
                       "--json")
    assert code == 0
    got = json.loads(out)
    assert got["pipeline_id"] == "d" and [s["step"] for s in got["plan"]][:3] == ["train", "evaluate", "gate"]


def test_set_overrides_pipeline_fields_from_the_command_line_and_the_job(cli):
    import subprocess
    import sys

    shipped = str(ROOT / "configs/pipeline.yaml")
    code, out, _ = cli("pipeline", "run", "--config", shipped, "--dry-run", "--id", "s",
                       "--set", "canary.hold_s=10", "--set", "canary.weights=[0.1, 0.5]")
    assert code == 0 and "weights 0.1, 0.5, each held >= 10 s" in out, out
    code, _, err = cli("pipeline", "run", "--config", shipped, "--dry-run", "--set", "canary.hold_s=-1")
    assert code == 1 and "canary.hold_s" in err and "with --set canary.hold_s" in err, err
    code, _, err = cli("pipeline", "run", "--config", shipped, "--dry-run", "--set", "canary.hold_s")
    assert code == 1 and "expected KEY=VALUE" in err, err
    job = subprocess.run([sys.executable, str(ROOT / "jobs/pipeline.py"), "--config", shipped, "--dry-run",
                          "--set", "canary.hold_s=10"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "each held >= 10 s" in json.dumps(json.loads(job.stdout.strip().splitlines()[-1])["plan"])


def test_lineage_prints_the_chain(cli):
    from mlray.registry import promote, register
    from mlray.registry.tracking import client, experiment_id

    mlflow_client = client()
    train_run = mlflow_client.create_run(experiment_id("lin"))
    mlflow_client.log_metric(train_run.info.run_id, "test_accuracy", 0.97)
    pipeline_run = mlflow_client.create_run(experiment_id("mlray-pipeline"),
                                            tags={"mlray.pipeline.outcome": "champion"})
    version = register("lin", model_uri=f"{train_run.info.artifact_uri}/model", run_id=train_run.info.run_id, tags={
        "mlray.run_id": train_run.info.run_id, "data.name": "digits", "data.fingerprint": "abc123",
        "git.commit": "deadbeef", "mlray.version": "0.1", "mlray.pipeline.id": "nightly-1",
        "mlray.pipeline.run_id": pipeline_run.info.run_id}).version
    promote("lin", version=version)
    code, out, _ = cli("lineage", "lin@champion")
    assert code == 0, out
    assert f"lin version {version}  (@champion)" in out
    assert f"trained in run {train_run.info.run_id}" in out and "test_accuracy=0.9700" in out
    assert "data digits  fingerprint abc123" in out and "code git deadbeef" in out
    assert f"pipeline nightly-1 (run {pipeline_run.info.run_id}, outcome champion)" in out
    code, out, _ = cli("lineage", "models:/lin/1", "--json")
    assert json.loads(out)["data"]["fingerprint"] == "abc123"
