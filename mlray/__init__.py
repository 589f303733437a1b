"""mlray: train a PyTorch model data-parallel on Ray, track it in MLflow, serve it on Ray Serve.

Importing this package has no side effects: it starts no Ray, touches no MLflow store, creates no folder,
and imports neither torch nor Ray; each name below is imported on first use. See docs/python-api.md.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module it lives in
_EXPORTS = {
    "train": "mlray.api", "tune": "mlray.api", "promote": "mlray.api", "serve": "mlray.api", "deploy": "mlray.api",
    "predict": "mlray.api", "load_model": "mlray.api", "compress": "mlray.api",
    "JobConfig": "mlray.config", "DataConfig": "mlray.config", "ModelConfig": "mlray.config",
    "TrainConfig": "mlray.config", "RegistryConfig": "mlray.config", "GateConfig": "mlray.config",
    "TuneSettings": "mlray.config", "load_config": "mlray.config", "parse_config": "mlray.config",
    "ServeAppConfig": "mlray.serving.config",
    "TrainResult": "mlray.training.train", "LoadedModel": "mlray.artifact", "MlrayError": "mlray.errors",
    "CompressResult": "mlray.compress.core", "CompressionRefused": "mlray.errors",
}

__all__ = [
    "CompressResult", "CompressionRefused", "DataConfig", "GateConfig", "JobConfig", "LoadedModel", "MlrayError",
    "ModelConfig", "RegistryConfig", "ServeAppConfig", "TrainConfig", "TrainResult", "TuneSettings", "compress",
    "deploy", "load_config", "load_model", "parse_config", "predict", "promote", "serve", "train", "tune",
]

if TYPE_CHECKING:
    from mlray.api import compress, deploy, load_model, predict, promote, serve, train, tune
    from mlray.artifact import LoadedModel
    from mlray.compress.core import CompressResult
    from mlray.config import (
        DataConfig,
        GateConfig,
        JobConfig,
        ModelConfig,
        RegistryConfig,
        TrainConfig,
        TuneSettings,
        load_config,
        parse_config,
    )
    from mlray.errors import CompressionRefused, MlrayError
    from mlray.serving.config import ServeAppConfig
    from mlray.training.train import TrainResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``mlray.compress`` is both a function of the API and a package. Importing a subpackage sets it as an
    attribute of its parent; here the API function keeps the name (the package stays importable as usual:
    ``from mlray.compress import CompressResult``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == "mlray.api":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
