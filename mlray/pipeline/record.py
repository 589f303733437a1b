"""The pipeline's record: one MLflow parent run per pipeline id, one tag per step.

Each step's tag (``mlray.pipeline.step.<name>``) holds JSON: its status (``running``, ``done``, ``skipped``,
``failed``), how many times it started, its inputs and outputs, and its seconds. The record is the only
state: a process that runs the same pipeline id again reads it back and skips every step that is ``done``
or ``skipped``; a step found ``running`` was interrupted and starts again (``starts`` counts the times, so a
test can prove that training ran once). Steps are written so that starting again is safe: each one either
records its result before acting on it, or acts idempotently (setting an alias to the version it holds).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mlray.registry import tracking

logger = logging.getLogger(__name__)

ID_TAG = "mlray.pipeline.id"
STEP_TAG = "mlray.pipeline.step."
OUTCOME_TAG = "mlray.pipeline.outcome"
REASON_TAG = "mlray.pipeline.reason"
DECISION_TAG = "mlray.pipeline.decision."
FINISHED = ("done", "skipped")


@dataclass
class StepRecord:
    status: str = "pending"
    starts: int = 0
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def pending(steps: tuple[str, ...], records: dict[str, StepRecord]) -> list[str]:
    """The steps still to run, in order: those not ``done`` or ``skipped`` (an interrupted one included)."""
    return [name for name in steps if not records.get(name, StepRecord()).finished]


class PipelineRecord:
    """Reads and writes the step records of one pipeline run (see the module docstring)."""

    def __init__(self, run_id: str, steps: dict[str, StepRecord], *, tracking_uri: str | None = None,
                 decisions: int = 0) -> None:
        self.run_id = run_id
        self.steps = steps
        self.decisions = decisions  # decisions recorded so far (a resumed run numbers on from there)
        self._client = tracking.client(tracking_uri)
        self._started: dict[str, float] = {}

    @classmethod
    def find(cls, pipeline_id: str, *, experiment: str, tracking_uri: str | None = None) -> PipelineRecord | None:
        mlflow_client = tracking.client(tracking_uri)
        found = mlflow_client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = mlflow_client.search_runs([found.experiment_id], f"tags.`{ID_TAG}` = '{pipeline_id}'")
        if not runs:
            return None
        run = runs[0]
        steps = {key.removeprefix(STEP_TAG): StepRecord(**json.loads(value))
                 for key, value in run.data.tags.items() if key.startswith(STEP_TAG)}
        decisions = sum(key.startswith(DECISION_TAG) for key in run.data.tags)
        return cls(run.info.run_id, steps, tracking_uri=tracking_uri, decisions=decisions)

    @classmethod
    def open(cls, pipeline_id: str, *, experiment: str, params: dict[str, str], tracking_uri: str | None = None
             ) -> tuple[PipelineRecord, bool]:
        """The record of ``pipeline_id``, created when new; returns it and whether it existed (a resume)."""
        found = cls.find(pipeline_id, experiment=experiment, tracking_uri=tracking_uri)
        mlflow_client = tracking.client(tracking_uri)
        if found is not None:
            mlflow_client.update_run(found.run_id, status="RUNNING")
            return found, True
        from mlflow.entities import Param

        exp_id = tracking.experiment_id(experiment, tracking_uri=tracking_uri)
        run = mlflow_client.create_run(exp_id, run_name=f"pipeline-{pipeline_id}",
                                       tags={ID_TAG: pipeline_id, **tracking.lineage_tags()})
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            mlflow_client.log_batch(run.info.run_id, params=items[start : start + 100])
        return cls(run.info.run_id, {}, tracking_uri=tracking_uri), False

    def step(self, name: str) -> StepRecord:
        return self.steps.setdefault(name, StepRecord())

    def _write(self, name: str) -> None:
        self._client.set_tag(self.run_id, f"{STEP_TAG}{name}", json.dumps(asdict(self.steps[name]), default=str))

    def start(self, name: str, inputs: dict[str, Any] | None = None) -> StepRecord:
        record = self.step(name)
        record.status, record.starts, record.error = "running", record.starts + 1, None
        record.inputs = inputs or record.inputs
        self._started[name] = time.monotonic()
        self._write(name)
        return record

    def progress(self, name: str, outputs: dict[str, Any]) -> None:
        """Outputs of a step still running (the canary's finished weights), kept for a resume."""
        self.step(name).outputs.update(outputs)
        self._write(name)

    def finish(self, name: str, outputs: dict[str, Any], *, status: str = "done") -> None:
        record = self.step(name)
        record.status, record.outputs = status, {**record.outputs, **outputs}
        if name in self._started:
            record.seconds = round(time.monotonic() - self._started[name], 3)
            self._client.log_metric(self.run_id, f"seconds.{name}", record.seconds)
        self._write(name)

    def fail(self, name: str, error: str) -> None:
        record = self.step(name)
        record.status, record.error = "failed", error[:2000]
        self._write(name)

    def decision(self, text: str, metrics: dict[str, float]) -> None:
        """A canary decision with its figures: a tag with the sentence, metrics at the decision's index."""
        index, self.decisions = self.decisions, self.decisions + 1
        self._client.set_tag(self.run_id, f"{DECISION_TAG}{index:03d}", text[:5000])
        for key, value in metrics.items():
            self._client.log_metric(self.run_id, key, value, step=index)

    def close(self, outcome: str, reason: str) -> None:
        self._client.set_tag(self.run_id, OUTCOME_TAG, outcome)
        self._client.set_tag(self.run_id, REASON_TAG, reason[:5000])
        self._client.log_dict(self.run_id, {"outcome": outcome, "reason": reason,
                                            "steps": {k: asdict(v) for k, v in self.steps.items()}},
                              "pipeline.json")
        self._client.set_terminated(self.run_id, "FINISHED")
