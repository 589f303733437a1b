"""The Python API a notebook or a script uses; ``import mlray`` exposes it (lazily, see ``mlray/__init__``).

Each function returns a value and takes its options as keywords. The CLI (``mlray ...``) and ``jobs/`` call
the same library functions underneath.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from mlray.artifact import LoadedModel
    from mlray.compress import CompressResult
    from mlray.config import GateConfig, JobConfig
    from mlray.registry import PromotionResult
    from mlray.serving.foreign import PyfuncModel
    from mlray.training.train import TrainResult
    from mlray.training.tune import SweepResult



def _job_config(config: JobConfig | str | Path | dict[str, Any] | None, overrides: dict[str, Any] | None
                ) -> JobConfig:
    from mlray.config import JobConfig, load_config, parse_config

    if isinstance(config, JobConfig):
        return parse_config(config.model_dump(mode="json"), overrides=overrides, origin="(given)") if overrides \
            else config
    if isinstance(config, dict):
        return parse_config(config, overrides=overrides, origin="(dict)")
    return load_config(config, overrides=overrides)


def train(config: JobConfig | str | Path | dict[str, Any] | None = None, *,
          overrides: dict[str, Any] | None = None, run_name: str | None = None, address: str | None = None,
          progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train data-parallel on Ray, record the MLflow run and register a new version.

    Args:
        config: a :class:`JobConfig`, a YAML path, a dict of fields, or None for the defaults.
        overrides: dotted fields to change, e.g. ``{"train.epochs": 5}``.
        run_name: the MLflow run's name.
        address: the Ray cluster; default a running one, else a new local one.
        progress: called with a line per finished epoch.
    """
    from mlray.training.train import train as run_training

    return run_training(_job_config(config, overrides), run_name=run_name, address=address, progress=progress)


def tune(config: JobConfig | str | Path | dict[str, Any], *, overrides: dict[str, Any] | None = None,
         address: str | None = None) -> SweepResult:
    """A hyperparameter sweep (the config's ``tune`` section); registers the best trial's model."""
    from mlray.training.tune import sweep

    return sweep(_job_config(config, overrides), address=address)


def promote(name: str, *, version: int, alias: str = "champion", gate: GateConfig | None = None,
            force: bool = False) -> PromotionResult:
    """Move ``name@alias`` to ``version`` if it passes the gate (a refusal raises PromotionRefused)."""
    from mlray.registry import promote as do_promote

    return do_promote(name, version=version, alias=alias, gate=gate, force=force)


def serve(name: str, *, alias: str = "champion", port: int | None = None, config: str | Path | None = None,
          address: str | None = None) -> str:
    """Deploy the Serve app for ``name@alias`` (settings from a Serve YAML, default serve_apps/digits.yaml)
    on the cluster at ``address`` (default: a running one, else a local head); returns its base URL."""
    from mlray import cluster
    from mlray.serving.deploy import deploy, load_plan

    plan = load_plan(config, overrides={"model": name, "alias": alias}, port=port)
    if address is None:
        address = cluster.start_head().address
    cluster.connect(address)
    return deploy(plan)


deploy = serve


def predict(name: str, rows: np.ndarray | list[list[float]], *, url: str = "http://127.0.0.1:8000",
            timeout_s: float = 30.0, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Ask a served model over HTTP (V1); returns its answer (``predictions``, and ``labels`` for classes)."""
    from mlray.client import predict as post

    return post(url, name, rows, timeout_s=timeout_s, headers=headers)


def compress(name: str, *, version: int, method: str, tolerance: float = 1.0, sparsity: float = 0.5,
             tracking_uri: str | None = None) -> CompressResult:
    """A compressed variant of ``name`` ``version`` (dynamic-int8, static-int8, fp16, bf16, prune, onnx), measured
    against its parent and registered as a new version when it loses at most ``tolerance`` points
    (otherwise CompressionRefused, and nothing is registered). See docs/compression.md."""
    from mlray.compress import compress as do_compress

    return do_compress(name, version=version, method=method, tolerance=tolerance, sparsity=sparsity,
                       tracking_uri=tracking_uri)


def load_model(name: str, *, alias: str | None = None, version: int | None = None,
               device: str | None = None) -> LoadedModel | PyfuncModel:
    """A registered version in this process, its weights' hash checked; ``.predict(x)`` gives (N, K).

    Without ``alias`` or ``version``: ``@champion``. ``device`` defaults to CUDA when this process has a GPU.
    A model logged by another tool comes back as a ``PyfuncModel`` (pickles refused: docs/any-model.md).
    """
    from mlray.artifact import LoadedModel
    from mlray.errors import ConfigError
    from mlray.serving.loader import load_registered

    if alias is None and version is None:
        alias = "champion"
    loaded = load_registered(name, alias=alias, version=version).loaded
    if device is None:
        return loaded
    if not isinstance(loaded, LoadedModel):
        raise ConfigError(f"device={device!r}: {name} was not logged by mlray; MLflow places it itself")
    import dataclasses

    import torch

    target = torch.device(device)
    loaded.model.to(target)
    return dataclasses.replace(loaded, device=target)
