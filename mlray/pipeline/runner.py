"""Running a pipeline: the plan, the steps in order, the record, resume.

``run(cfg, pipeline_id=...)`` is what ``mlray pipeline run`` and ``jobs/pipeline.py`` call. The same id
again resumes: the steps already ``done`` are skipped (their recorded outputs are read back), the
interrupted one starts again, and a pipeline that already ended returns its recorded outcome.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlray.config import JobConfig, load_config
from mlray.errors import ConfigError
from mlray.pipeline import steps, watch
from mlray.pipeline.config import PipelineConfig
from mlray.pipeline.record import OUTCOME_TAG, REASON_TAG, PipelineRecord, StepRecord, pending

logger = logging.getLogger(__name__)

StepFn = Callable[[steps.Context], steps.StepResult]
STEPS: dict[str, StepFn] = {
    "train": steps.train, "evaluate": steps.evaluate, "gate": steps.gate, "register": steps.register,
    "compress": steps.compress, "deploy": steps.deploy, "watch": watch.watch, "finish": watch.finish,
}


@dataclass(frozen=True)
class PipelineResult:
    pipeline_id: str
    run_id: str
    outcome: str  # champion | refused | rolled_back
    reason: str
    resumed: bool
    steps: dict[str, StepRecord] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline_id": self.pipeline_id, "run_id": self.run_id, "outcome": self.outcome,
                "reason": self.reason, "resumed": self.resumed,
                "steps": {name: {"status": s.status, "starts": s.starts, "seconds": s.seconds, "outputs": s.outputs}
                          for name, s in self.steps.items()}}


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def job_config(cfg: PipelineConfig) -> JobConfig:
    job = load_config(Path(cfg.job), overrides=dict(cfg.overrides))
    if cfg.trainer == "tune" and job.tune is None:
        raise ConfigError(f"trainer 'tune' needs a tune section in the job config {cfg.job!r} "
                          "(see configs/digits-tune.yaml), or trainer: train")
    return job


def plan(cfg: PipelineConfig, *, pipeline_id: str) -> list[tuple[str, str]]:
    """(step, what it will do) for each step, from the config alone (``--dry-run``; reads no registry)."""
    job = job_config(cfg)
    app, gate, canary = cfg.app or job.name, cfg.gate or job.registry.gate, cfg.canary
    compress = (f"{cfg.compress.method} variant (sparsity {cfg.compress.sparsity}) if accuracy drops by at most "
                f"{cfg.compress.tolerance}; otherwise ship it uncompressed" if cfg.compress.enabled
                else "skipped (compress.enabled is false)")
    return [
        ("train", f"{cfg.job}: {job.name}, {job.train.epochs} epochs on {job.train.num_workers} workers, "
                  + (f"train.run_name {steps.train_run_name(pipeline_id)} (registers a new version)"
                     if cfg.trainer == "train" or job.tune is None else
                     f"a sweep of {job.tune.num_samples} trials, tune.sweep_name {steps.train_run_name(pipeline_id)} "
                     "(registers the best trial)")),
        ("evaluate", f"the new version's {gate.metric} on the test split"),
        ("gate", f"{gate.metric} ({gate.direction}, min improvement {gate.min_improvement}) against "
                 f"{job.name}@champion; stop if refused"),
        ("register", f"tag the version with pipeline {pipeline_id} (lineage)"),
        ("compress", compress),
        ("deploy", f"{job.name}@{canary.alias} -> the version, weight {canary.weights[0]:g}, in Serve app {app!r}"),
        ("watch", f"weights {', '.join(f'{w:g}' for w in canary.weights)}, each held >= {canary.hold_s:g} s and "
                  f">= {canary.min_requests} challenger requests; roll back if its 5xx rate exceeds the champion's "
                  f"by {canary.max_error_rate_increase} or its p99 exceeds {canary.max_p99_ratio:g}x + "
                  f"{canary.p99_slack_s * 1000:.0f} ms (compared from {canary.min_p99_requests} requests a side)"),
        ("finish", f"promote to {job.name}@champion, or roll back; then remove @{canary.alias}"),
    ]


def _params(cfg: PipelineConfig, job: JobConfig) -> dict[str, str]:
    from mlray.training.run import flat_params

    params = {f"pipeline.{k}": v for k, v in flat_params(cfg.model_dump(mode="json")).items()}
    params.update({f"job.{k}": v for k, v in flat_params(job.model_dump(mode="json")).items()})
    return params


def run(cfg: PipelineConfig, *, pipeline_id: str | None = None, address: str | None = None,
        progress: Callable[[str], None] | None = None, step_fns: dict[str, StepFn] | None = None) -> PipelineResult:
    """Run (or resume) the pipeline ``pipeline_id``; see the module docstring.

    ``step_fns`` replaces step functions by name (the unit tests run the runner without Ray).
    """
    from mlray.registry import tracking

    pipeline_id = pipeline_id or new_id()
    job = job_config(cfg)
    say = progress or (lambda line: logger.info("%s", line))
    record, resumed = PipelineRecord.open(pipeline_id, experiment=cfg.experiment, params=_params(cfg, job))
    run_tags = tracking.client().get_run(record.run_id).data.tags
    if OUTCOME_TAG in run_tags:
        say(f"pipeline {pipeline_id} already ended: {run_tags[OUTCOME_TAG]}")
        tracking.client().set_terminated(record.run_id, "FINISHED")
        return PipelineResult(pipeline_id, record.run_id, run_tags[OUTCOME_TAG], run_tags.get(REASON_TAG, ""),
                              resumed, dict(record.steps))
    if resumed:
        say(f"resuming pipeline {pipeline_id} (run {record.run_id}) at "
            f"{(pending(tuple(STEPS), record.steps) or ['the end'])[0]}")
    ctx = steps.Context(cfg=cfg, job=job, pipeline_id=pipeline_id, record=record, say=say, address=address)
    fns = {**STEPS, **(step_fns or {})}
    # A step that ended the pipeline records why; a run killed before the close still ends there on resume.
    ended = [s.outputs["stop"] for s in record.steps.values() if s.finished and "stop" in s.outputs]
    outcome: tuple[str, str] | None = (str(ended[0][0]), str(ended[0][1])) if ended else None
    for name in pending(tuple(STEPS), record.steps):
        if outcome is not None:
            record.start(name)
            record.finish(name, {"reason": f"not run: the pipeline ended ({outcome[0]})"}, status="skipped")
            continue
        record.start(name)
        try:
            result = fns[name](ctx)
        except BaseException as err:
            record.fail(name, f"{type(err).__name__}: {err}")  # the same id again retries this step
            tracking.client().set_terminated(record.run_id, "FAILED")
            raise
        stop = {"stop": list(result.stop)} if result.stop is not None else {}
        record.finish(name, {**result.outputs, **stop}, status=result.status)
        if result.stop is not None:
            outcome = result.stop
    if outcome is None:  # resumed after every step finished but before the close
        finished = record.step("finish").outputs
        outcome = (str(finished.get("outcome", "unknown")), str(finished.get("reason", "")))
    record.close(*outcome)
    say(f"pipeline {pipeline_id}: {outcome[0]}: {outcome[1]}")
    return PipelineResult(pipeline_id, record.run_id, outcome[0], outcome[1], resumed, dict(record.steps))
