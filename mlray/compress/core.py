"""``compress(name, version=N, method=...)``: a variant of a registered version, measured, gated, registered.

The steps: read the parent version and the data config of its training run; rebuild the run's splits
(checked against the run's data fingerprint); make the variant and write its model folder; load both models
back from their folders and measure them the same way (:mod:`mlray.compress.measure`); record everything on
a new MLflow run that is a child of the parent's run; then let :class:`ToleranceGate` decide. A variant
within tolerance is logged and registered as a new version of the same model, tagged with its method,
parent and figures; otherwise :class:`~mlray.errors.CompressionRefused` carries both figures and nothing
is registered.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlray import settings
from mlray.artifact import ARTIFACT_KEY, LoadedModel, load_model_dir, write_model_dir
from mlray.compress import measure
from mlray.compress.methods import VariantInputs, check_method, make_variant
from mlray.config import DataConfig
from mlray.errors import CompressionRefused, ConfigError, DataError
from mlray.registry import VersionInfo, get_version, register, tracking
from mlray.training.data import local_splits

logger = logging.getLogger(__name__)

TAG_PREFIX = "mlray.compress."


@dataclass(frozen=True)
class CompressResult:
    """A registered variant: its version, the MLflow run that measured it, and its figures."""

    method: str
    parent_version: int
    version: int
    run_id: str
    figures: dict[str, float]


@dataclass(frozen=True)
class Verdict:
    register: bool
    reason: str


class ToleranceGate:
    """Whether a variant may be registered: its metric loss (points, see :func:`measure.metric_loss_points`)
    is at most ``tolerance``."""

    def __init__(self, *, tolerance: float, task: str) -> None:
        if not tolerance >= 0:
            raise ConfigError(f"tolerance {tolerance!r} must be a number of points >= 0")
        self.tolerance, self.task = tolerance, task

    def decide(self, *, method: str, parent: float, variant: float, parent_version: int) -> Verdict:
        metric = measure.task_metric(self.task)
        lost = measure.metric_loss_points(self.task, parent, variant)
        figures = (f"{metric} {variant:.4f} vs {parent:.4f} of version {parent_version} "
                   f"({lost:+.2f} points lost, tolerance {self.tolerance:g})")
        if lost <= self.tolerance:
            return Verdict(True, f"{method}: {figures}")
        return Verdict(False, f"refused to register the {method} variant: {figures}; nothing was registered")


def compress(name: str, *, version: int, method: str, tolerance: float = 1.0, sparsity: float = 0.5,
             tracking_uri: str | None = None) -> CompressResult:
    """Make, measure and (within ``tolerance`` points) register the ``method`` variant of ``name`` ``version``.

    Raises:
        CompressionRefused: the metric loss exceeds the tolerance, or the method does not apply to the model.
        ConfigError: an unknown method, or a sparsity or tolerance out of range.
        NotFound: no such version.
    """
    check_method(method, sparsity=sparsity)
    parent = get_version(name, version=version, tracking_uri=tracking_uri)
    if f"{TAG_PREFIX}method" in parent.tags:
        raise CompressionRefused(
            f"{name} version {version} is already a {parent.tags[TAG_PREFIX + 'method']} variant of version "
            f"{parent.tags.get(TAG_PREFIX + 'parent_version', '?')}; compress that version instead")
    mlflow_client = tracking.client(tracking_uri)
    parent_run = mlflow_client.get_run(parent.run_id)
    params, task = parent_run.data.params, parent_run.data.params.get("task", "classification")
    gate = ToleranceGate(tolerance=tolerance, task=task)
    splits = _splits(params, parent_run.data.tags.get("data.fingerprint"), name=name, version=version, task=task)
    loss = _param(params, "train.loss") or ("cross_entropy" if task == "classification" else "mse")

    tags = {**tracking.lineage_tags(), "mlflow.parentRunId": parent.run_id, f"{TAG_PREFIX}method": method,
            f"{TAG_PREFIX}parent_version": str(version), f"{TAG_PREFIX}parent_run_id": parent.run_id}
    for key in ("data.fingerprint", "data.name"):
        if key in parent_run.data.tags:
            tags[key] = parent_run.data.tags[key]
    run = mlflow_client.create_run(parent_run.info.experiment_id, run_name=f"{name}-v{version}-{method}", tags=tags)
    run_id = run.info.run_id
    try:
        mlflow_client.log_batch(run_id, params=_params(method, tolerance, sparsity, version))
        with tempfile.TemporaryDirectory(prefix="mlray-compress-") as tmp:
            parent_dir, parent_loaded = _download(parent, Path(tmp) / "parent", tracking_uri=tracking_uri)
            if parent_loaded.variant != "none":  # a variant registered without mlray's tags
                raise CompressionRefused(f"{name} version {version} is already a {parent_loaded.variant} variant")
            folder = Path(tmp) / "variant" / ARTIFACT_KEY
            variant_model = make_variant(parent_loaded.model, method,
                                         VariantInputs(train_x=splits["train"].x, test_x=splits["test"].x,
                                                       sparsity=sparsity), folder=folder)
            meta = write_model_dir(folder, model=variant_model, feature_names=parent_loaded.feature_names,
                                   class_names=parent_loaded.class_names,
                                   extra={"run_id": run_id, "data": parent_loaded.meta.get("data")},
                                   variant={"method": method, "parent_version": version,
                                            "parent_run_id": parent.run_id,
                                            **({"sparsity": sparsity} if method == "prune" else {})})
            variant_loaded = load_model_dir(folder, device="cpu")  # measured as it will be served: from its files
            figures = _figures(parent_loaded, parent_dir, variant_loaded, folder, splits["test"], loss=loss,
                               task=task)
            mlflow_client.log_batch(run_id, metrics=_metrics(figures))
            metric = measure.task_metric(task)
            verdict = gate.decide(method=method, parent=figures[f"parent_{metric}"], variant=figures[metric],
                                  parent_version=version)
            logger.info("%s", verdict.reason)
            if not verdict.register:
                mlflow_client.set_tag(run_id, f"{TAG_PREFIX}outcome", "refused")
                mlflow_client.set_tag(run_id, f"{TAG_PREFIX}reason", verdict.reason[:5000])
                mlflow_client.set_terminated(run_id, "FINISHED")
                raise CompressionRefused(verdict.reason)
            example = splits["test"].x[:2]
            model_uri = tracking.log_model(run_id, folder, feature_names=parent_loaded.feature_names,
                                           example=example, tracking_uri=tracking_uri,
                                           extra_requirements=["onnxruntime"] if method == "onnx" else None)
        version_tags = {**tags, "mlray.weights_sha256": str(meta["weights_sha256"]), "mlray.run_id": run_id,
                        **{f"{TAG_PREFIX}{key}": f"{value:.6g}" for key, value in figures.items()}}
        version_tags.pop("mlflow.parentRunId")
        registered = register(name, model_uri=model_uri, run_id=run_id, tags=version_tags,
                              tracking_uri=tracking_uri)  # all or nothing itself
        try:
            mlflow_client.set_tag(run_id, f"{TAG_PREFIX}outcome", f"registered as version {registered.version}")
            mlflow_client.set_tag(run_id, "mlray.weights_sha256", str(meta["weights_sha256"]))
            mlflow_client.set_terminated(run_id, "FINISHED")
        except BaseException:
            mlflow_client.delete_model_version(name, str(registered.version))  # no version without its record
            raise
    except CompressionRefused as err:
        if mlflow_client.get_run(run_id).info.status == "RUNNING":  # a method that does not apply
            mlflow_client.set_tag(run_id, f"{TAG_PREFIX}outcome", "refused")
            mlflow_client.set_tag(run_id, f"{TAG_PREFIX}reason", str(err)[:5000])
            mlflow_client.set_terminated(run_id, "FINISHED")
        raise
    except BaseException as err:
        mlflow_client.set_tag(run_id, "mlray.failure", f"{type(err).__name__}: {err}"[:5000])
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    logger.info("Registered %s version %d: the %s variant of version %d", name, registered.version, method, version)
    return CompressResult(method=method, parent_version=version, version=registered.version, run_id=run_id,
                          figures=figures)


def _param(params: dict[str, str], key: str) -> str | None:
    value = params.get(key)
    return None if value in (None, "None", "") else value


def _splits(params: dict[str, str], fingerprint: str | None, *, name: str, version: int, task: str
            ) -> dict[str, measure.Split]:
    """The parent run's splits, from the data config it logged, checked against its data fingerprint."""
    # Not data.num_classes: the run logs the data's class count under that key (TrainingRun.log_params), and the
    # rows and their split do not depend on it.
    fields = {key: _param(params, f"data.{key}") for key in ("source", "label_column", "val_fraction", "test_fraction")}
    if fields["source"] is None or _param(params, "seed") is None:
        raise CompressionRefused(f"{name} version {version}: its run records no data.source and seed, so its "
                                 "test split cannot be rebuilt (was it trained by mlray?)")
    data = DataConfig.model_validate({key: value for key, value in fields.items() if value is not None})
    try:
        rows, found = local_splits(data, seed=int(str(_param(params, "seed"))), task=task)
    except DataError as err:
        raise CompressionRefused(f"{name} version {version}: its test split cannot be rebuilt here: {err}") from None
    if fingerprint and found != fingerprint:
        raise DataError(f"data.source {data.source!r} has fingerprint {found[:12]}... here, but version {version} "
                        f"was trained on {fingerprint[:12]}...: the data changed, so its test split is not the same")
    return {split: measure.Split(x, y) for split, (x, y) in rows.items()}


def _download(info: VersionInfo, target: Path, *, tracking_uri: str | None) -> tuple[Path, LoadedModel]:
    import mlflow

    from mlray.artifact import find_model_dir

    uri = tracking_uri or settings.tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    target.mkdir(parents=True)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{info.name}/{info.version}",
                                                dst_path=str(target))
    folder = find_model_dir(Path(local))
    return folder, load_model_dir(folder, expected_sha256=info.tags.get("mlray.weights_sha256"), device="cpu")


def _figures(parent: LoadedModel, parent_dir: Path, variant: LoadedModel, variant_dir: Path, test: measure.Split,
             *, loss: str, task: str) -> dict[str, float]:
    """The variant's figures, the parent's (prefixed parent_), and the ratios and differences between them."""
    mine, theirs = measure.figures([(variant, variant_dir), (parent, parent_dir)], test, loss=loss)
    metric = measure.task_metric(task)
    out = {**mine, **{f"parent_{key}": value for key, value in theirs.items()}}
    out["metric_loss_points"] = measure.metric_loss_points(task, theirs[metric], mine[metric])
    out["size_ratio"] = theirs["size_bytes"] / max(mine["size_bytes"], 1.0)
    for size in measure.LATENCY_BATCHES:
        out[f"speedup_b{size}"] = theirs[f"latency_ms_b{size}"] / max(mine[f"latency_ms_b{size}"], 1e-9)
    return out


def _params(method: str, tolerance: float, sparsity: float, version: int) -> list[Any]:
    from mlflow.entities import Param

    values = {"method": method, "tolerance_points": tolerance, "parent_version": version}
    if method == "prune":
        values["sparsity"] = sparsity
    return [Param(key, str(value)) for key, value in values.items()]


def _metrics(figures: dict[str, float]) -> list[Any]:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, 0) for key, value in figures.items()]
