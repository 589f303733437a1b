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
from mlray.errors import ConfigError, TrainingFailed
from mlray.loop import LoopConfig, load_state, train_loop_per_worker
from mlray.models import ModelSpec, build, check_model, factory_code

RUN_NAME_TAG = "mlray.train_run_name"  # Ray Train's run name: its checkpoints live under it
MODEL_URI_TAG = "mlray.model_uri"

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


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _trainer(cfg: JobConfig, loop_cfg: LoopConfig, datasets: dict[str, Any], run_name: str,
             callbacks: list[Any] | None = None) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = cfg.train
    return TorchTrainer(
        # Ray types the loop as returning None, but accepts one that returns a value (Result.return_value).
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config=loop_cfg.to_dict(),
        # gloo on CPUs; NCCL where every worker has a GPU.
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=train.resources_per_worker,
            placement_strategy=train.placement_strategy,
        ),
        run_config=RunConfig(
            # The same name and storage path let a re-run driver continue from the stored checkpoints.
            name=run_name,
            storage_path=train.storage_path or str(settings.checkpoint_root()),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
            callbacks=callbacks,
        ),
        datasets=datasets,
    )


class _EpochProgress:
    """Reports each epoch as it lands in MLflow, from a background thread, while ``fit()`` blocks."""

    def __init__(self, run_id: str, epochs: int, progress: Callable[[str], None], metric: str = "val_accuracy"
                 ) -> None:
        self._run_id, self._epochs, self._progress, self._metric = run_id, epochs, progress, metric
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
                history = {m.step: m.value for m in mlflow_client.get_metric_history(self._run_id, self._metric)}
            except Exception:  # noqa: BLE001 - progress is best effort; training goes on regardless
                continue
            for step in sorted(s for s in history if s > shown):
                self._progress(f"epoch {step + 1}/{self._epochs}: {self._metric} {history[step]:.4f}")
                shown = step


@dataclass(frozen=True)
class _Prepared:
    data: Any
    model_spec: ModelSpec


def _prepare(cfg: JobConfig) -> _Prepared:
    """Data and model spec, checked on the driver before any run or worker exists: the labels fit the task,
    and the factory imports, takes its arguments and maps a (2, F) batch to (2, K)."""
    prepared = prepare(cfg.data, seed=cfg.seed, task=cfg.task)
    spec = prepared.spec
    model_spec = ModelSpec(factory=cfg.model.factory_path, num_features=spec.num_features,
                           num_outputs=spec.num_outputs, kwargs=cfg.model.factory_kwargs, task=cfg.task)
    check_model(model_spec)
    return _Prepared(data=prepared, model_spec=model_spec)


def runs_named(experiment_id: str, name: str) -> list[Any]:
    """The MLflow runs of the experiment that a driver started with ``train.run_name`` = ``name``."""
    return list(tracking.client().search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'"))


def _open_run(cfg: JobConfig, *, experiment_id: str, tags: dict[str, str], mlflow_run_name: str | None,
              parent_run_id: str | None = None) -> tuple[str, bool]:
    """Create the run, or reopen the unfinished one with the same ``train.run_name`` (a re-run driver).

    Returns the run id and whether it was reopened.
    """
    mlflow_client = tracking.client()
    name = cfg.train.run_name
    if name:
        found = runs_named(experiment_id, name)
        if found:
            run = found[0]
            if run.info.status == "FINISHED":
                raise ConfigError(f"train.run_name {name!r} already finished as run {run.info.run_id}; "
                                  "choose a new name to train again")
            mlflow_client.update_run(run.info.run_id, status="RUNNING")
            logger.info("Continuing MLflow run %s (train.run_name %r)", run.info.run_id, name)
            return run.info.run_id, True
    run_tags = dict(tags)
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=mlflow_run_name or name, tags=run_tags)
    run_id = run.info.run_id
    mlflow_client.set_tag(run_id, RUN_NAME_TAG, name or f"{cfg.name}-{run_id[:12]}")
    return run_id, False


def _log_params(run_id: str, cfg: JobConfig, prepared: _Prepared, extra: dict[str, Any] | None = None) -> None:
    from mlflow.entities import Param

    spec = prepared.data.spec
    params = _flatten(cfg.model_dump(mode="json"))
    params.update({f"data.size.{k}": str(v) for k, v in spec.sizes.items()})
    params.update({"data.num_features": str(spec.num_features), "data.num_classes": str(spec.num_classes)})
    params.update({k: str(v) for k, v in (extra or {}).items()})
    items = [Param(key, value[:6000]) for key, value in params.items()]
    mlflow_client = tracking.client()
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def _fit(cfg: JobConfig, prepared: _Prepared, run_id: str, *, progress: Callable[[str], None] | None = None,
         callbacks: list[Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run data-parallel training; returns rank 0's final values and the last checkpoint's state."""
    spec = prepared.data.spec
    code = factory_code(prepared.model_spec.factory)
    loop_cfg = LoopConfig(
        model=prepared.model_spec.to_dict(), mean=spec.mean, std=spec.std, epochs=cfg.train.epochs,
        batch_size=cfg.train.batch_size, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, seed=cfg.seed,
        tracking_uri=settings.tracking_uri(), run_id=run_id, precision=cfg.train.precision,
        cpus_per_worker=(cfg.train.resources_per_worker or {}).get("CPU", 1.0), loss=cfg.loss,
        target_mean=spec.target_mean or None, target_std=spec.target_std or None,
        code_root=str(code.root) if code else None,
    )
    run_name = tracking.client().get_run(run_id).data.tags[RUN_NAME_TAG]
    trainer = _trainer(cfg, loop_cfg, prepared.data.datasets, run_name=run_name, callbacks=callbacks)
    watched = "val_accuracy" if cfg.task == "classification" else "val_rmse"
    with _EpochProgress(run_id, cfg.train.epochs, progress, watched) if progress else contextlib.nullcontext():
        result = trainer.fit()
    if result.error is not None or result.checkpoint is None or result.return_value is None:
        raise TrainingFailed(f"training of {cfg.name!r} failed: {result.error}")
    with result.checkpoint.as_directory() as folder:
        state = load_state(Path(folder))
    return result.return_value, state


def _record_results(run_id: str, prepared: _Prepared, final: dict[str, Any], state: dict[str, Any]
                    ) -> tuple[dict[str, float], str, str]:
    """Log test metrics, the report artifacts and the model; returns metrics, model URI, weights sha256."""
    import torch

    from mlray.artifact import ARTIFACT_KEY, write_model_dir

    spec = prepared.data.spec
    history = final["history"]
    metrics = {key: float(value) for key, value in final.items() if key.startswith("test_") and key != "test_count"}
    metrics.update({f"final_{k}": float(v) for k, v in history[-1].items()
                    if k.startswith("val_") or k in ("train_accuracy", "train_rmse")})
    mlflow_client = tracking.client()
    for key, score in metrics.items():
        mlflow_client.log_metric(run_id, key, score)
    mlflow_client.set_tag(run_id, "mlray.worker_nodes", ",".join(final["worker_nodes"]))

    model = build(prepared.model_spec)
    model.load_state_dict(state["model"])
    tracking.log_report_artifacts(run_id, history=history, confusion=final.get("confusion"),
                                  class_names=spec.class_names)
    with tempfile.TemporaryDirectory() as tmp:
        model_folder = Path(tmp) / ARTIFACT_KEY  # MLflow names the artifact after the folder
        meta = write_model_dir(model_folder, model=model, feature_names=spec.feature_names,
                               class_names=spec.class_names, extra={"run_id": run_id, "data": spec.name})
        example = torch.tensor(spec.mean).unsqueeze(0).repeat(2, 1).numpy()
        model_uri = tracking.log_model(run_id, model_folder, feature_names=spec.feature_names, example=example)
    mlflow_client.set_tag(run_id, MODEL_URI_TAG, model_uri)
    mlflow_client.set_tag(run_id, "mlray.weights_sha256", meta["weights_sha256"])
    return metrics, model_uri, str(meta["weights_sha256"])


def root_cause(err: BaseException) -> str:
    """The last line of an error (Ray wraps worker tracebacks; the cause is at the bottom)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _fail_run(run_id: str, cfg: JobConfig, err: BaseException) -> None:
    """Mark the run FAILED (nothing was registered) and raise a short error naming the cause."""
    tracking.client().set_terminated(run_id, "FAILED")
    cause = root_cause(err)
    tracking.client().set_tag(run_id, "mlray.failure", cause[:5000])
    logger.error("Run %s marked FAILED: %s", run_id, cause)
    if isinstance(err, Exception) and not isinstance(err, TrainingFailed):
        raise TrainingFailed(f"training of {cfg.name!r} failed in run {run_id}: {cause} "
                             "(the workers' full tracebacks are in the logs and the Ray dashboard)") from err


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
    prepared = _prepare(cfg)
    spec = prepared.data.spec
    exp_id = tracking.experiment_id(cfg.experiment_name)
    tags = {**tracking.lineage_tags(), "data.fingerprint": spec.fingerprint, "data.name": spec.name}
    run_id, reopened = _open_run(cfg, experiment_id=exp_id, tags=tags, mlflow_run_name=run_name)
    logger.info("MLflow run %s (experiment %s)", run_id, cfg.experiment_name)
    try:
        if not reopened:
            _log_params(run_id, cfg, prepared)
        final, state = _fit(cfg, prepared, run_id, progress=progress)
        metrics, model_uri, sha256 = _record_results(run_id, prepared, final, state)
        version = register(cfg.name, model_uri=model_uri, run_id=run_id, tags={
            **tags, "mlray.weights_sha256": sha256, "mlray.run_id": run_id,
        })
        tracking.client().set_terminated(run_id, "FINISHED")
    except BaseException as err:
        _fail_run(run_id, cfg, err)
        raise
    return TrainResult(run_id=run_id, experiment_id=exp_id, model_name=cfg.name, version=version.version,
                       model_uri=model_uri, metrics=metrics, history=final["history"],
                       worker_nodes=list(final["worker_nodes"]))
