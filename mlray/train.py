"""The driver side of training: data, TorchTrainer, the MLflow run, the registered version.

``train(config)`` is what ``mlray train``, ``jobs/train.py`` and the quickstart call. It creates the
MLflow run before any worker starts, runs data-parallel training on Ray Train, logs the results and
registers a new model version, and returns a :class:`TrainResult`. If anything fails, the run is marked
FAILED and nothing is registered.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlray import cluster, settings, tracking
from mlray.config import JobConfig
from mlray.data import prepare
from mlray.errors import TrainingFailed
from mlray.loop import LoopConfig, load_state, train_loop_per_worker

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

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test_accuracy"]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _trainer(cfg: JobConfig, loop_cfg: LoopConfig, datasets: dict[str, Any], run_name: str):  # type: ignore[no-untyped-def]
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = cfg.train
    return TorchTrainer(
        # Ray types the loop as returning None, but accepts one that returns a value (Result.return_value).
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config=loop_cfg.to_dict(),
        # gloo on CPUs; NCCL where every worker has a GPU.
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=train.resources_per_worker
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=train.storage_path or str(settings.checkpoint_root()),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
        datasets=datasets,
    )


class _EpochProgress:
    """Reports each epoch as it lands in MLflow, from a background thread, while ``fit()`` blocks."""

    def __init__(self, run_id: str, epochs: int, progress: Callable[[str], None]) -> None:
        self._run_id, self._epochs, self._progress = run_id, epochs, progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="mlray-epoch-progress", daemon=True)

    def __enter__(self) -> _EpochProgress:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        mlflow_client = tracking.client()
        shown = -1
        while not self._stop.wait(1.0):
            try:
                history = {m.step: m.value for m in mlflow_client.get_metric_history(self._run_id, "val_accuracy")}
            except Exception:  # noqa: BLE001 - progress is best effort; training goes on regardless
                continue
            for step in sorted(s for s in history if s > shown):
                self._progress(f"epoch {step + 1}/{self._epochs}: val_accuracy {history[step]:.4f}")
                shown = step


def train(cfg: JobConfig, *, run_name: str | None = None, address: str | None = None,
          progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train, record and register one model version; see the module docstring.

    ``progress`` is called with a line per finished epoch (the CLI prints them).
    """
    import torch

    from mlray.artifact import ARTIFACT_KEY, write_model_dir
    from mlray.models import ModelSpec, build
    from mlray.registry import register

    cluster.apply_env()  # Train v2 hands the driver's RAY_TRAIN_* settings on to its controller
    cluster.connect(address)
    prepared = prepare(cfg.data, seed=cfg.seed)
    spec = prepared.spec
    model_spec = ModelSpec(arch=cfg.model.arch, num_features=spec.num_features, num_classes=spec.num_classes,
                           hidden=cfg.model.hidden, dropout=cfg.model.dropout)
    build(model_spec)  # fail on a bad architecture before anything is recorded

    exp_id = tracking.experiment_id(cfg.experiment_name)
    mlflow_client = tracking.client()
    tags = {**tracking.lineage_tags(), "data.fingerprint": spec.fingerprint, "data.name": spec.name}
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    logger.info("MLflow run %s (experiment %s)", run_id, cfg.experiment_name)
    try:
        params = _flatten(cfg.model_dump(mode="json"))
        params.update({f"data.size.{k}": str(v) for k, v in spec.sizes.items()})
        params.update({"data.num_features": str(spec.num_features), "data.num_classes": str(spec.num_classes)})
        for key, value in params.items():
            mlflow_client.log_param(run_id, key, value[:6000])

        loop_cfg = LoopConfig(
            model=model_spec.to_dict(), mean=spec.mean, std=spec.std, epochs=cfg.train.epochs,
            batch_size=cfg.train.batch_size, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, seed=cfg.seed,
            tracking_uri=settings.tracking_uri(), run_id=run_id,
        )
        trainer = _trainer(cfg, loop_cfg, prepared.datasets, run_name=f"{cfg.name}-{run_id[:12]}")
        with _EpochProgress(run_id, cfg.train.epochs, progress) if progress else contextlib.nullcontext():
            result = trainer.fit()
        if result.error is not None or result.checkpoint is None or result.return_value is None:
            raise TrainingFailed(f"training of {cfg.name!r} failed: {result.error}")
        final: dict[str, Any] = result.return_value
        metrics = {"test_accuracy": float(final["test_accuracy"]), "test_loss": float(final["test_loss"])}
        history = final["history"]
        last = history[-1]
        metrics.update({f"final_{k}": float(last[k]) for k in ("train_accuracy", "val_accuracy", "val_loss")})
        for key, score in metrics.items():
            mlflow_client.log_metric(run_id, key, score)

        with result.checkpoint.as_directory() as folder:
            state = load_state(Path(folder))
        model = build(model_spec)
        model.load_state_dict(state["model"])
        tracking.log_report_artifacts(run_id, history=history, confusion=final["confusion"],
                                      class_names=spec.class_names)
        with tempfile.TemporaryDirectory() as tmp:
            model_folder = Path(tmp) / ARTIFACT_KEY  # MLflow names the artifact after the model_folder
            meta = write_model_dir(model_folder, model=model, feature_names=spec.feature_names,
                                   class_names=spec.class_names, extra={"run_id": run_id, "data": spec.name})
            example = torch.tensor(spec.mean).unsqueeze(0).repeat(2, 1).numpy()
            model_uri = tracking.log_model(run_id, model_folder, feature_names=spec.feature_names,
                                           example=example)
        version = register(cfg.name, model_uri=model_uri, run_id=run_id, tags={
            **tags, "mlray.weights_sha256": meta["weights_sha256"], "mlray.run_id": run_id,
        })
        mlflow_client.set_terminated(run_id, "FINISHED")
    except BaseException as err:
        mlflow_client.set_terminated(run_id, "FAILED")
        logger.error("Run %s marked FAILED: %s", run_id, err)
        if isinstance(err, Exception) and not isinstance(err, TrainingFailed):
            raise TrainingFailed(f"training of {cfg.name!r} failed in run {run_id}: {err}") from err
        raise
    return TrainResult(run_id=run_id, experiment_id=exp_id, model_name=cfg.name, version=version.version,
                       model_uri=model_uri, metrics=metrics, history=history)
