"""Resolve ``NAME@ALIAS`` (or a version) in the registry, download it, load it with its hash checked.

A model mlray logged loads through :func:`mlray.artifact.load_model_dir` (safetensors, the weights' sha256
from its tags); any other MLflow model through :mod:`mlray.serving.foreign` (the files' sha256 recorded at
first load and checked after; pickles only with ``allow_pickle``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlray import settings
from mlray.artifact import META_FILE, LoadedModel, load_model_dir, tree_sha256
from mlray.errors import ModelLoadError
from mlray.registry import VersionInfo, get_version
from mlray.serving.foreign import FILES_TAG, NUM_FEATURES_TAG, PyfuncModel, check_files, keep_files, load_pyfunc_dir

logger = logging.getLogger(__name__)

Loaded = LoadedModel | PyfuncModel
"""A model ready to answer: mlray's own, or one loaded through MLflow (same predict/predict_proba surface)."""


@dataclass(frozen=True)
class ServedModel:
    loaded: Loaded
    info: VersionInfo
    alias: str | None
    load_seconds: float


def load_registered(name: str, *, alias: str | None = None, version: int | None = None,
                    tracking_uri: str | None = None, allow_pickle: bool = False) -> ServedModel:
    import mlflow

    started = time.perf_counter()
    info = get_version(name, alias=alias, version=version, tracking_uri=tracking_uri)
    loaded: Loaded
    with tempfile.TemporaryDirectory(prefix="mlray-model-") as tmp:
        try:
            uri = tracking_uri or settings.tracking_uri()
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{info.version}", dst_path=tmp)
        except Exception as err:  # noqa: BLE001 - any download failure means this version cannot serve
            raise ModelLoadError(f"cannot download {name} version {info.version}: {err}") from None
        root = Path(local)
        if any(root.rglob(META_FILE)):
            loaded = load_model_dir(root, expected_sha256=info.tags.get("mlray.weights_sha256"))
        else:
            files = tree_sha256(root)
            if check_files(files, info.tags.get(FILES_TAG), where=f"{name} version {info.version}"):
                mlflow.MlflowClient(uri, uri).set_model_version_tag(name, str(info.version), FILES_TAG, files)
                logger.info("Recorded %s=%s for %s version %s", FILES_TAG, files[:16], name, info.version)
            width = info.tags.get(NUM_FEATURES_TAG)
            loaded = load_pyfunc_dir(keep_files(root, files), allow_pickle=allow_pickle,
                                     num_features=int(width) if width and width.isdigit() else None)
    seconds = time.perf_counter() - started
    logger.info("Loaded %s version %s (%s) in %.2f s", name, info.version, f"@{alias}" if alias else "pinned", seconds)
    return ServedModel(loaded=loaded, info=info, alias=alias, load_seconds=seconds)
