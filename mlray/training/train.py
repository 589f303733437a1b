"""The driver side of training: data, TorchTrainer, the MLflow run, the registered version.

``train(config)`` is what ``mlray train``, ``jobs/train.py`` and the quickstart call. It creates the
MLflow run before any worker starts, runs data-parallel training on Ray Train, logs the results and
registers a new model version, and returns a :class:`TrainResult`. If anything fails, the run is marked
FAILED and nothing is registered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from mlray import cluster
from mlray.config import JobConfig
from mlray.registry import tracking
from mlray.training.run import MODEL_URI_TAG, RUN_NAME_TAG, TrainingRun, prepare_training

__all__ = ["MODEL_URI_TAG", "RUN_NAME_TAG", "TrainResult", "train"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    experiment_id: str
    model_name: str
    version: int
    model_uri: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)  # Ray node id of each rank

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test_accuracy"]

    @property
    def test_rmse(self) -> float:
        return self.metrics["test_rmse"]


def train(cfg: JobConfig, *, run_name: str | None = None, address: str | None = None,
          progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train, record and register one model version; see the module docstring.

    ``run_name`` names the MLflow run; ``cfg.train.run_name`` names the training itself, and a driver
    re-run with the same one continues from its checkpoints in the same MLflow run. ``progress`` is
    called with a line per finished epoch (the CLI prints them).
    """
    from mlray.registry import register

    cluster.apply_env()  # Train v2 hands the driver's RAY_TRAIN_* settings on to its controller
    cluster.connect(address)
    prepared = prepare_training(cfg)
    spec = prepared.data.spec
    exp_id = tracking.experiment_id(cfg.experiment_name)
    tags = {**tracking.lineage_tags(), "data.fingerprint": spec.fingerprint, "data.name": spec.name}
    run = TrainingRun.open(cfg, experiment_id=exp_id, tags=tags, mlflow_run_name=run_name, prepared=prepared)
    logger.info("MLflow run %s (experiment %s)", run.run_id, cfg.experiment_name)
    with run.failing():
        run.log_params()
        final, state = run.fit(progress=progress)
        metrics, model_uri, sha256 = run.record(final, state)
        version = register(cfg.name, model_uri=model_uri, run_id=run.run_id, tags={
            **tags, "mlray.weights_sha256": sha256, "mlray.run_id": run.run_id,
        })
        run.finish()
    return TrainResult(run_id=run.run_id, experiment_id=exp_id, model_name=cfg.name, version=version.version,
                       model_uri=model_uri, metrics=metrics, history=final["history"],
                       worker_nodes=list(final["worker_nodes"]))
