"""Resolve ``NAME@ALIAS`` (or a version) in the registry, download it, load it with its hash checked."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlray import settings
from mlray.artifact import LoadedModel, load_model_dir
from mlray.errors import ModelLoadError
from mlray.registry import VersionInfo, get_version

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    loaded: LoadedModel
    info: VersionInfo
    alias: str | None
    load_seconds: float


def load_registered(name: str, *, alias: str | None = None, version: int | None = None,
                    tracking_uri: str | None = None) -> ServedModel:
    import mlflow

    started = time.perf_counter()
    info = get_version(name, alias=alias, version=version, tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="mlray-model-") as tmp:
        try:
            uri = tracking_uri or settings.tracking_uri()
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{info.version}", dst_path=tmp)
        except Exception as err:  # noqa: BLE001 - any download failure means this version cannot serve
            raise ModelLoadError(f"cannot download {name} version {info.version}: {err}") from None
        loaded = load_model_dir(Path(local), expected_sha256=info.tags.get("mlray.weights_sha256"))
    seconds = time.perf_counter() - started
    logger.info("Loaded %s version %s (%s) in %.2f s", name, info.version, f"@{alias}" if alias else "pinned", seconds)
    return ServedModel(loaded=loaded, info=info, alias=alias, load_seconds=seconds)
