"""MLflow runs: creation before the workers start, per-epoch metrics, artifacts, the logged model, lineage.

The run is created by the driver so its id is known before any worker starts; rank 0 logs each epoch's
metrics under that id (step = epoch) right after the epoch's checkpoint is stored. After a restart,
:meth:`EpochLogger.sync` logs what the checkpoint holds and MLflow does not, so the record has exactly one
value per epoch: no gaps, no duplicates.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlray import __version__, settings

logger = logging.getLogger(__name__)

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds",
                 "samples_per_second")  # classification; regression's are REGRESSION_EPOCH_METRICS
REGRESSION_EPOCH_METRICS = ("train_loss", "train_rmse", "val_loss", "val_rmse", "val_mae", "val_r2", "lr",
                            "epoch_seconds", "samples_per_second")
_LOGGED = tuple(dict.fromkeys(EPOCH_METRICS + REGRESSION_EPOCH_METRICS))
# The pyfunc's source, logged with every model ("models from code"). It stays at mlray/pyfunc_entry.py: MLflow
# copies the file into the model, and the copy imports mlray.artifact when the model is loaded.
PYFUNC_ENTRY = Path(__file__).resolve().parents[1] / "pyfunc_entry.py"
ATTEMPTS_TAG = "mlray.attempts"  # JSON list: the first epoch of each training attempt


_READY_STORES: set[str] = set()


def client(tracking_uri: str | None = None):  # type: ignore[no-untyped-def]
    """An MlflowClient for the tracking and registry URI (the embedded SQLite store by default).

    A new SQLite store is created (schema and migrations) under a file lock: MLflow's migrations are not
    safe when two processes (a driver and its workers, a poller) open a fresh store at the same time.
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or settings.tracking_uri()
    if uri.startswith("sqlite:///") and uri not in _READY_STORES:
        from filelock import FileLock

        database = Path(uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{database}.lock"):
            MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
        _READY_STORES.add(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_location(name: str) -> str | None:
    """Where a new experiment called ``name`` keeps its artifacts; None lets the tracking server choose.

    An absolute folder under the artifact root, named after the experiment. Under an MLflow server's proxied
    root (``mlflow-artifacts:``, as on a cluster) the server chooses ``mlflow-artifacts:/<experiment id>``:
    its basic-auth app authorizes an artifact upload by the experiment id that starts the path, and refused
    (403) every upload of a run under ``mlflow-artifacts:/digits``.
    """
    root = settings.artifact_root()
    if root.startswith("mlflow-artifacts:"):
        return None
    return f"{root.rstrip('/')}/{name}"


def experiment_id(name: str, *, tracking_uri: str | None = None) -> str:
    """The experiment's id, creating it with its :func:`artifact_location` when it is new."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = artifact_location(name)
    try:
        return str(mlflow_client.create_experiment(name, artifact_location=location))
    except Exception:  # noqa: BLE001 - another process created it first
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def lineage_tags() -> dict[str, str]:
    """Where a run came from: git commit, Ray job id (under `ray job submit`), mlray version."""
    tags = {"mlray.version": __version__}
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
    submission = _ray_job_submission_id()
    if submission:
        tags["ray.job_id"] = submission
    return tags


def _git_commit() -> str | None:
    """HEAD of the current directory's repository, else of the checkout mlray is installed from
    (under `ray job submit` the job runs in a copy of the project without its .git)."""
    source = settings.editable_source_root()
    for folder in (None, str(source) if source else None):
        try:
            done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                  cwd=folder, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def _ray_job_submission_id() -> str | None:
    """The id `ray job submit` printed (raysubmit_...), from the job config Ray hands the driver."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id") or None
    except (ValueError, AttributeError):
        return None


class EpochLogger:
    """Logs one value per epoch per metric into an existing run (used on rank 0).

    It reads which epochs the run already holds once, when an attempt starts, and never logs those
    again: an epoch that is re-run after a failure keeps the value of its first run.
    """

    def __init__(self, tracking_uri: str | None, run_id: str) -> None:
        self._client = client(tracking_uri)
        self._run_id = run_id
        self._have = {m.step for m in self._client.get_metric_history(run_id, EPOCH_METRICS[0])}

    def log_epoch(self, metrics: dict[str, float]) -> bool:
        """Log an epoch's metrics unless the run has them already; returns whether it logged."""
        from mlflow.entities import Metric

        step = int(metrics["epoch"])
        if step in self._have:
            return False
        now = int(time.time() * 1000)
        batch = [Metric(key, float(metrics[key]), now, step) for key in _LOGGED if key in metrics]
        self._client.log_batch(self._run_id, metrics=batch)
        self._have.add(step)
        return True

    def sync(self, history: Iterable[dict[str, float]]) -> int:
        """Log the epochs in ``history`` that the run does not have yet; returns how many."""
        logged = sum(self.log_epoch(metrics) for metrics in history)
        if logged:
            logger.info("Logged %d epoch(s) a previous attempt checkpointed but did not record", logged)
        return logged

    def record_attempt(self, start_epoch: int) -> list[int]:
        """Append this attempt's first epoch to the run's ``mlray.attempts`` tag ("[0, 3]": resumed at 3)."""
        import json

        tags = self._client.get_run(self._run_id).data.tags
        attempts = json.loads(tags.get(ATTEMPTS_TAG, "[]")) + [start_epoch]
        self._client.set_tag(self._run_id, ATTEMPTS_TAG, json.dumps(attempts))
        return attempts


def learning_curve_png(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(h["epoch"]) for h in history]
    score = "accuracy" if "val_accuracy" in history[0] else "rmse"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, axis in (("loss", left), (score, right)):
        axis.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
        axis.plot(epochs, [h[f"val_{key}"] for h in history], label="validation")
        axis.set_xlabel("epoch")
        axis.set_ylabel(key)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def confusion_png(confusion: list[list[int]], class_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(confusion, cmap="Blues")
    axis.set_xticks(range(len(class_names)), class_names)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            axis.text(j, i, str(count), ha="center", va="center", fontsize=7)
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def log_report_artifacts(run_id: str, *, history: list[dict[str, float]], confusion: list[list[int]] | None,
                         class_names: list[str], tracking_uri: str | None = None) -> None:
    """The learning curve and (classification) the confusion matrix as PNGs, with their numbers as JSON."""
    import json

    mlflow_client = client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        learning_curve_png(history, folder / "learning_curve.png")
        if confusion is not None:
            confusion_png(confusion, class_names, folder / "confusion_matrix.png")
            (folder / "confusion_matrix.json").write_text(json.dumps({"classes": class_names, "matrix": confusion}))
        (folder / "history.json").write_text(json.dumps(history))
        mlflow_client.log_artifacts(run_id, str(folder), artifact_path="report")


def log_model(run_id: str, model_dir: Path, *, feature_names: list[str], example: Any,
              tracking_uri: str | None = None, extra_requirements: list[str] | None = None) -> str:
    """Log the mlray model folder as an MLflow pyfunc model (models-from-code, nothing pickled).

    A user factory's source is inside the folder (``code/``, see :mod:`mlray.artifact`), which the pyfunc's
    loader puts on sys.path: MLflow's ``code_paths`` is not needed for it. Returns the logged model's URI
    (``models:/m-...``).
    """
    import mlflow
    import numpy as np
    import pandas as pd
    import torch
    from mlflow.models import infer_signature

    from mlray.artifact import ARTIFACT_KEY, load_model_dir, pyfunc_output

    mlflow.set_tracking_uri(tracking_uri or settings.tracking_uri())
    frame = pd.DataFrame(np.asarray(example, dtype=np.float64), columns=feature_names)
    loaded = load_model_dir(model_dir, device="cpu")
    outputs = pyfunc_output(loaded, loaded.predict(frame.to_numpy()))
    # Explicit requirements: inferring them is slow and would list the whole venv (bench/README.md).
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "safetensors", f"mlflow=={mlflow.__version__}",
                    "numpy", "pandas", *(extra_requirements or [])]
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # MLflow 3 asks for type hints on predict(); the signature below is the contract instead.
        warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_ENTRY),
            artifacts={ARTIFACT_KEY: str(model_dir)},
            signature=infer_signature(frame, outputs),
            input_example=frame.head(2),
            pip_requirements=requirements,
        )
    return str(info.model_uri)


def new_suffix() -> str:
    """A short unique suffix for generated names (sweeps)."""
    import uuid

    return uuid.uuid4().hex[:8]
