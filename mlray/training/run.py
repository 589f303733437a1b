"""One training recorded as one MLflow run: what ``mlray.train`` (one model) and ``mlray.tune`` (one trial) share.

:class:`TrainingRun` checks the data and the model on the driver before any run or worker exists, opens the
MLflow run (or reopens the unfinished one a re-run driver left under the same ``train.run_name``), logs the
config once, runs data-parallel training on Ray Train, records the test metrics, the report artifacts and the
model, and on any error marks the run FAILED with its cause. What each caller adds stays with it: ``train``
registers a version, a trial reports to Tune.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlray import settings
from mlray.config import JobConfig
from mlray.errors import ConfigError, TrainingFailed
from mlray.models import ModelSpec, build, check_model, factory_code
from mlray.registry import tracking
from mlray.training.data import prepare
from mlray.training.loop import LoopConfig, load_state, train_loop_per_worker

RUN_NAME_TAG = "mlray.train_run_name"  # Ray Train's run name: its checkpoints live under it
MODEL_URI_TAG = "mlray.model_uri"

logger = logging.getLogger(__name__)


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
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
class Prepared:
    data: Any
    model_spec: ModelSpec


def prepare_training(cfg: JobConfig) -> Prepared:
    """Data and model spec, checked on the driver before any run or worker exists: the labels fit the task,
    and the factory imports, takes its arguments and maps a (2, F) batch to (2, K)."""
    prepared = prepare(cfg.data, seed=cfg.seed, task=cfg.task)
    spec = prepared.spec
    model_spec = ModelSpec(factory=cfg.model.factory_path, num_features=spec.num_features,
                           num_outputs=spec.num_outputs, kwargs=cfg.model.factory_kwargs, task=cfg.task)
    check_model(model_spec)
    return Prepared(data=prepared, model_spec=model_spec)


def runs_named(experiment_id: str, name: str) -> list[Any]:
    """The MLflow runs of the experiment that a driver started with ``train.run_name`` = ``name``."""
    return list(tracking.client().search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'"))


def root_cause(err: BaseException) -> str:
    """The last line of an error (Ray wraps worker tracebacks; the cause is at the bottom)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


@dataclass(frozen=True)
class TrainingRun:
    """A training's MLflow run. Open one with :meth:`open`; use :meth:`failing` around the work."""

    cfg: JobConfig
    prepared: Prepared
    run_id: str
    reopened: bool  # a re-run driver continues the unfinished run of the same ``train.run_name``

    @classmethod
    def open(cls, cfg: JobConfig, *, experiment_id: str, tags: dict[str, str], mlflow_run_name: str | None = None,
             parent_run_id: str | None = None, prepared: Prepared | None = None) -> TrainingRun:
        """Check data and model (unless ``prepared`` is given), then create the run or reopen it. The run is
        tagged with the data's name and fingerprint besides ``tags``."""
        prepared = prepared or prepare_training(cfg)
        spec = prepared.data.spec
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
                return cls(cfg, prepared, run.info.run_id, reopened=True)
        run_tags = {"data.fingerprint": spec.fingerprint, "data.name": spec.name, **tags}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run_id = mlflow_client.create_run(experiment_id, run_name=mlflow_run_name or name, tags=run_tags).info.run_id
        mlflow_client.set_tag(run_id, RUN_NAME_TAG, name or f"{cfg.name}-{run_id[:12]}")
        return cls(cfg, prepared, run_id, reopened=False)

    def log_params(self, extra: dict[str, Any] | None = None) -> None:
        """The config, the data's sizes and ``extra``; once (a reopened run has them already)."""
        from mlflow.entities import Param

        if self.reopened:
            return
        spec = self.prepared.data.spec
        params = flat_params(self.cfg.model_dump(mode="json"))
        params.update({f"data.size.{k}": str(v) for k, v in spec.sizes.items()})
        params.update({"data.num_features": str(spec.num_features), "data.num_classes": str(spec.num_classes)})
        params.update({k: str(v) for k, v in (extra or {}).items()})
        items = [Param(key, value[:6000]) for key, value in params.items()]
        mlflow_client = tracking.client()
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow_client.log_batch(self.run_id, params=items[start : start + 100])

    def fit(self, *, progress: Callable[[str], None] | None = None, callbacks: list[Any] | None = None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run data-parallel training; returns rank 0's final values and the last checkpoint's state."""
        cfg, prepared = self.cfg, self.prepared
        spec = prepared.data.spec
        code = factory_code(prepared.model_spec.factory)
        loop_cfg = LoopConfig(
            model=prepared.model_spec.to_dict(), mean=spec.mean, std=spec.std, epochs=cfg.train.epochs,
            batch_size=cfg.train.batch_size, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, seed=cfg.seed,
            tracking_uri=settings.tracking_uri(), run_id=self.run_id, precision=cfg.train.precision,
            cpus_per_worker=(cfg.train.resources_per_worker or {}).get("CPU", 1.0), loss=cfg.loss,
            target_mean=spec.target_mean or None, target_std=spec.target_std or None,
            code_root=str(code.root) if code else None,
        )
        run_name = tracking.client().get_run(self.run_id).data.tags[RUN_NAME_TAG]
        trainer = _trainer(cfg, loop_cfg, prepared.data.datasets, run_name=run_name, callbacks=callbacks)
        watched = "val_accuracy" if cfg.task == "classification" else "val_rmse"
        with _EpochProgress(self.run_id, cfg.train.epochs, progress, watched) if progress \
                else contextlib.nullcontext():
            result = trainer.fit()
        if result.error is not None or result.checkpoint is None or result.return_value is None:
            raise TrainingFailed(f"training of {cfg.name!r} failed: {result.error}")
        with result.checkpoint.as_directory() as folder:
            state = load_state(Path(folder))
        return result.return_value, state

    def record(self, final: dict[str, Any], state: dict[str, Any]) -> tuple[dict[str, float], str, str]:
        """Log test metrics, the report artifacts and the model; returns metrics, model URI, weights sha256."""
        import torch

        from mlray.artifact import ARTIFACT_KEY, write_model_dir

        spec = self.prepared.data.spec
        history = final["history"]
        metrics = {key: float(value) for key, value in final.items()
                   if key.startswith("test_") and key != "test_count"}
        metrics.update({f"final_{k}": float(v) for k, v in history[-1].items()
                        if k.startswith("val_") or k in ("train_accuracy", "train_rmse")})
        mlflow_client = tracking.client()
        for key, score in metrics.items():
            mlflow_client.log_metric(self.run_id, key, score)
        mlflow_client.set_tag(self.run_id, "mlray.worker_nodes", ",".join(final["worker_nodes"]))

        model = build(self.prepared.model_spec)
        model.load_state_dict(state["model"])
        tracking.log_report_artifacts(self.run_id, history=history, confusion=final.get("confusion"),
                                      class_names=spec.class_names)
        with tempfile.TemporaryDirectory() as tmp:
            model_folder = Path(tmp) / ARTIFACT_KEY  # MLflow names the artifact after the folder
            meta = write_model_dir(model_folder, model=model, feature_names=spec.feature_names,
                                   class_names=spec.class_names, extra={"run_id": self.run_id, "data": spec.name})
            example = torch.tensor(spec.mean).unsqueeze(0).repeat(2, 1).numpy()
            model_uri = tracking.log_model(self.run_id, model_folder, feature_names=spec.feature_names,
                                           example=example)
        mlflow_client.set_tag(self.run_id, MODEL_URI_TAG, model_uri)
        mlflow_client.set_tag(self.run_id, "mlray.weights_sha256", meta["weights_sha256"])
        return metrics, model_uri, str(meta["weights_sha256"])

    def finish(self) -> None:
        tracking.client().set_terminated(self.run_id, "FINISHED")

    @contextlib.contextmanager
    def failing(self) -> Iterator[None]:
        """Any error inside marks the run FAILED (nothing was registered) and is raised as a short
        :class:`TrainingFailed` naming the cause (an interrupt is re-raised as it is)."""
        try:
            yield
        except BaseException as err:
            tracking.client().set_terminated(self.run_id, "FAILED")
            cause = root_cause(err)
            tracking.client().set_tag(self.run_id, "mlray.failure", cause[:5000])
            logger.error("Run %s marked FAILED: %s", self.run_id, cause)
            if isinstance(err, Exception) and not isinstance(err, TrainingFailed):
                raise TrainingFailed(f"training of {self.cfg.name!r} failed in run {self.run_id}: {cause} "
                                     "(the workers' full tracebacks are in the logs and the Ray dashboard)") from err
            raise
