"""The pipeline's steps up to the canary: train, evaluate, gate, register, compress, deploy.

Each step takes the run's :class:`Context` and returns a :class:`StepResult`; what it needs from an earlier
step it reads from that step's recorded outputs, so a resumed run sees exactly what the first one did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlray import registry
from mlray.config import GateConfig, JobConfig
from mlray.errors import ConfigError, MlrayError, NotFound
from mlray.pipeline.config import PipelineConfig
from mlray.pipeline.record import PipelineRecord
from mlray.registry import tracking

logger = logging.getLogger(__name__)

PIPELINE_ID_TAG = "mlray.pipeline.id"  # on the model version: the pipeline run that shipped it
PIPELINE_RUN_TAG = "mlray.pipeline.run_id"
COMPRESSED_FROM_TAG = "mlray.compressed_from"


@dataclass
class Context:
    cfg: PipelineConfig
    job: JobConfig
    pipeline_id: str
    record: PipelineRecord
    say: Callable[[str], None]
    address: str | None = None

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def app(self) -> str:
        return self.cfg.app or self.job.name

    @property
    def gate(self) -> GateConfig:
        return self.cfg.gate or self.job.registry.gate

    def out(self, step: str) -> dict[str, Any]:
        return self.record.step(step).outputs


@dataclass(frozen=True)
class StepResult:
    outputs: dict[str, Any] = field(default_factory=dict)
    status: str = "done"
    stop: tuple[str, str] | None = None  # (outcome, reason): the pipeline ends here


def train_run_name(pipeline_id: str) -> str:
    return f"pipeline-{pipeline_id}"


def train(ctx: Context) -> StepResult:
    """mlray's own training (:func:`mlray.training.train.train`) under ``train.run_name = pipeline-<id>``: a run killed
    during training continues from its checkpoints, and one that finished is found, not trained again."""

    from mlray.training.run import runs_named
    from mlray.training.train import train as run_training

    if ctx.cfg.trainer == "tune":
        return _tune(ctx)
    run_name = train_run_name(ctx.pipeline_id)
    job = ctx.job.model_copy(update={"train": ctx.job.train.model_copy(update={"run_name": run_name})})
    exp_id = tracking.experiment_id(job.experiment_name)
    finished = [r for r in runs_named(exp_id, run_name) if r.info.status == "FINISHED"]
    if finished:  # trained and registered before the record said so: take that version
        run_id = finished[0].info.run_id
        versions = tracking.client().search_model_versions(f"name='{job.name}' and run_id='{run_id}'")
        if versions:
            version = max(int(v.version) for v in versions)
            ctx.say(f"train: run {run_id} already trained and registered version {version}")
            return StepResult({"run_id": run_id, "version": version})
    result = run_training(job, address=ctx.address, progress=lambda line: ctx.say(f"train: {line}"))
    tracking.client().set_tag(result.run_id, "mlflow.parentRunId", ctx.record.run_id)
    ctx.say(f"train: registered {result.model_name} version {result.version} (run {result.run_id})")
    return StepResult({"run_id": result.run_id, "version": result.version, "metrics": result.metrics})


def _tune(ctx: Context) -> StepResult:
    """mlray's sweep (:func:`mlray.training.tune.sweep`) under ``tune.sweep_name = pipeline-<id>``: a killed
    sweep resumes its trials, and one that finished is found by its registered version, not run again."""
    from mlray.training.tune import SWEEP_TAG, sweep

    assert ctx.job.tune is not None  # job_config checked it
    name = train_run_name(ctx.pipeline_id)
    registered = [v for v in tracking.client().search_model_versions(f"name='{ctx.name}'")
                  if (v.tags or {}).get(SWEEP_TAG) == name]
    if registered:
        found = max(registered, key=lambda v: int(v.version))
        ctx.say(f"train: sweep {name} already registered version {found.version}")
        return StepResult({"run_id": found.run_id, "version": int(found.version), "sweep": name})
    job = ctx.job.model_copy(update={"tune": ctx.job.tune.model_copy(update={"sweep_name": name})})
    result = sweep(job, address=ctx.address)
    tracking.client().set_tag(result.parent_run_id, "mlflow.parentRunId", ctx.record.run_id)
    ctx.say(f"train: sweep {name} ({result.trials} trials) registered the best trial as version {result.version}")
    return StepResult({"run_id": result.best_run_id, "version": result.version, "sweep": name,
                       "best_config": result.best_config})


def evaluate(ctx: Context) -> StepResult:
    """The candidate's test-split figures, as its training run evaluated and recorded them (on the held-out
    split no epoch saw), read back from the registry so the gate and the record use the same numbers."""
    version = int(ctx.out("train")["version"])
    info = registry.get_version(ctx.name, version=version)
    test = {k: v for k, v in info.metrics.items() if k.startswith("test_")}
    if ctx.gate.metric not in test:
        raise MlrayError(f"version {version} of {ctx.name!r} has no {ctx.gate.metric!r} (it has {sorted(test)})")
    ctx.say(f"evaluate: version {version} {ctx.gate.metric} = {test[ctx.gate.metric]:.4f} on the test split")
    return StepResult({"version": version, "metric": ctx.gate.metric, "value": test[ctx.gate.metric],
                       "test_metrics": test})


def gate(ctx: Context) -> StepResult:
    """:class:`mlray.registry.PromotionGate` against the version holding ``@champion`` now."""
    version = int(ctx.out("train")["version"])
    candidate = registry.get_version(ctx.name, version=version)
    try:
        champion: registry.VersionInfo | None = registry.get_version(ctx.name, alias="champion")
    except NotFound:
        champion = None
    verdict = registry.PromotionGate(ctx.gate).decide(candidate, champion)
    outputs = {"passed": verdict.promote, "reason": verdict.reason,
               "champion_version": champion.version if champion else None}
    ctx.say(f"gate: {'passed' if verdict.promote else 'refused'}: {verdict.reason}")
    if not verdict.promote:
        tracking.client().set_model_version_tag(ctx.name, str(version), "mlray.pipeline.gate", verdict.reason[:5000])
        return StepResult(outputs, stop=("refused", verdict.reason))
    return StepResult(outputs)


def _lineage_tags(ctx: Context) -> dict[str, str]:
    return {PIPELINE_ID_TAG: ctx.pipeline_id, PIPELINE_RUN_TAG: ctx.record.run_id,
            "mlray.pipeline.gate": str(ctx.out("gate")["reason"])[:5000]}


def register(ctx: Context) -> StepResult:
    """The version was registered by training; this ties it to the pipeline run (lineage tags)."""
    version = int(ctx.out("train")["version"])
    mlflow_client = tracking.client()
    tags = _lineage_tags(ctx)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(ctx.name, str(version), key, value)
    ctx.say(f"register: version {version} tagged with pipeline {ctx.pipeline_id}")
    return StepResult({"version": version, "tags": sorted(tags)})


def compress(ctx: Context) -> StepResult:
    """Optional (``compress.enabled``): ship ``mlray.compress``'s variant, or the original when it refuses."""
    version = int(ctx.out("train")["version"])
    settings = ctx.cfg.compress
    if not settings.enabled:
        return StepResult({"served_version": version, "compressed": False,
                           "reason": "compress.enabled is false"}, status="skipped")
    try:
        from mlray.compress import CompressionRefused
        from mlray.compress import compress as do_compress
    except ImportError as err:
        raise ConfigError(f"compress.enabled is true but mlray.compress cannot be imported ({err}); "
                          "set compress.enabled: false") from None
    try:
        result = do_compress(ctx.name, version=version, method=settings.method, tolerance=settings.tolerance,
                             sparsity=settings.sparsity)
    except CompressionRefused as err:
        ctx.say(f"compress: shipping version {version} uncompressed: {err}")
        return StepResult({"served_version": version, "compressed": False, "reason": str(err)})
    mlflow_client = tracking.client()
    for key, value in {**_lineage_tags(ctx), COMPRESSED_FROM_TAG: str(version)}.items():
        mlflow_client.set_model_version_tag(ctx.name, str(result.version), key, value)
    ctx.say(f"compress: {settings.method} variant is version {result.version}: {result.figures}")
    return StepResult({"served_version": result.version, "compressed": True, "method": result.method,
                       "run_id": result.run_id, "figures": dict(result.figures),
                       "reason": f"{settings.method} kept accuracy within {settings.tolerance}"})


def require_canary_app(status: dict[str, Any], *, app: str, alias: str, model: str) -> None:
    """A canary needs an app that serves ``model`` with a challenger section; say which is missing. A
    many-models app names its challenger per model (``models: [{name: NAME, challenger: {...}}]``)."""
    if "models" in status:
        if model not in status["models"]:
            raise ConfigError(f"the Serve app {app!r} does not serve {model!r}; it serves {sorted(status['models'])}")
        if "challenger" not in status["models"][model]["targets"]:
            raise ConfigError(f"the Serve app {app!r} serves {model!r} without a challenger; give its entry "
                              f"challenger: {{alias: {alias}}} (models: [{{name: {model}, challenger: "
                              f"{{alias: {alias}}}}}]) to run a canary")
        return
    if "challenger" not in status["targets"]:
        raise ConfigError(f"the Serve app {app!r} has no challenger section; deploy it with "
                          f"challenger: {{alias: {alias}, mode: split}} in its args to run a canary")


def deploy(ctx: Context) -> StepResult:
    """The candidate becomes the app's challenger at the first canary weight (set before the alias, so the
    app never sends it more); the step waits until every replica has loaded it."""
    from mlray.serving.deploy import app_status, rollout

    version = int(ctx.out("compress")["served_version"])
    canary = ctx.cfg.canary
    require_canary_app(app_status(ctx.app), app=ctx.app, alias=canary.alias, model=ctx.name)
    registry.set_challenger_weight(ctx.name, canary.weights[0])
    tracking.client().set_registered_model_alias(ctx.name, canary.alias, str(version))
    status = rollout(ctx.app, timeout_s=ctx.cfg.rollout_timeout_s, model=ctx.name)
    failed = {replica: errors[f"challenger:v{version}"] for replica, errors in status["failures"].items()
              if isinstance(errors, dict) and f"challenger:v{version}" in errors}
    # a many-models app: the replicas that hold the model (Serve routes its requests to them)
    loaded = [r["versions"].get("challenger") == version for r in status["replicas"].values() if r.get("held", True)]
    if failed or not loaded or not all(loaded):
        reason = f"challenger version {version} did not load on every replica: {failed or status['replicas']}"
        ctx.say(f"deploy: {reason}")
        return StepResult({"version": version, "loaded": False, "reason": reason})
    ctx.say(f"deploy: version {version} is {ctx.app}'s challenger at weight {canary.weights[0]:g} "
            f"on {len(loaded)} replica(s)")
    return StepResult({"version": version, "loaded": True, "champion_version": status["targets"]["champion"]})
