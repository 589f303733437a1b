"""Models from factories named by import path, behind mlray's standardisation.

A factory is any function ``factory(*, num_features, num_outputs, **kwargs) -> nn.Module`` whose module maps
float32 ``(N, F)`` to ``(N, K)``: logits for classification, values for regression. The job config names it
(``model.factory: "package.module:function"`` and ``model.kwargs``); the built-ins :func:`mlp` and
:func:`cnn` are factories of the same kind, and ``model.arch: mlp | cnn`` is a shorthand for them.

:class:`StandardizedModel` puts a :class:`Standardize` layer in front of the factory's module. Its mean and
std are buffers fitted on the training split: they travel inside the weights, so serving applies exactly
the transform training used. What gets stored beside the weights is the plain :class:`ModelSpec` dict
(factory path, kwargs, sizes): no pickled classes anywhere. Where the factory's source travels with a
model, see :mod:`mlray.artifact`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlray.config import BUILTIN_FACTORIES
from mlray.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights (stored as JSON with them)."""

    factory: str
    num_features: int
    num_outputs: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if "arch" in data:  # the format-1 spec of models registered before factories: mlp/cnn by name
            return cls(factory=BUILTIN_FACTORIES.get(data["arch"], data["arch"]), num_features=data["num_features"],
                       num_outputs=data["num_classes"],
                       kwargs={"hidden": list(data.get("hidden", ())), "dropout": data.get("dropout", 0.0)})
        return cls(**data)


class Standardize(nn.Module):
    """(x - mean) / std with the training split's statistics; constant features pass through centred."""

    mean: torch.Tensor  # buffers registered in __init__
    std: torch.Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def fit(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        std_t = torch.as_tensor(std, dtype=torch.float32)
        self.std.copy_(torch.where(std_t > 1e-6, std_t, torch.ones_like(std_t)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, F)
        return (x - self.mean) / self.std


# -- the built-in factories ------------------------------------------------------------------------------------

def mlp(*, num_features: int, num_outputs: int, hidden: Sequence[int] = (128, 64), dropout: float = 0.0
        ) -> nn.Module:
    """Fully connected layers with ReLU and dropout; ``hidden`` empty is a linear model."""
    layers: list[nn.Module] = []
    width = num_features
    for size in hidden:
        layers += [nn.Linear(width, int(size)), nn.ReLU(), nn.Dropout(dropout)]
        width = int(size)
    layers.append(nn.Linear(width, num_outputs))  # (B, H) -> (B, K)
    return nn.Sequential(*layers)


def cnn(*, num_features: int, num_outputs: int, hidden: Sequence[int] = (32, 128), dropout: float = 0.0
        ) -> nn.Module:
    """A small CNN for square single-channel images given as flat rows (digits: 64 = 8x8).

    Enough parameters and FLOPs per sample that DDP's gradient all-reduce and compute are both real,
    so overhead and scaling figures mean something. ``hidden`` is (channels, dense width).
    """
    side = int(round(num_features**0.5))
    if side * side != num_features:
        raise ConfigError(f"model.arch 'cnn' needs square images; {num_features} features is not a square")
    channels = int(hidden[0]) if hidden else 32
    width = int(hidden[1]) if len(hidden) > 1 else 128
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),  # (B, F) -> (B, 1, S, S)
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels * 2, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 2C, S/2, S/2)
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(channels * 2 * (side // 2) ** 2, width), nn.ReLU(),
        nn.Linear(width, num_outputs),
    )


# -- resolving a factory by import path ------------------------------------------------------------------------

def resolve_factory(path: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function; a :class:`ConfigError` naming ``model.factory`` if the
    module does not import or has no such callable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model.factory {path!r} must look like 'package.module:function'")
    try:
        module = _import(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the config's problem, reported as such
        raise ConfigError(
            f"model.factory {path!r}: module {module_name!r} does not import ({type(err).__name__}: {err}); "
            "it must be importable where training runs: an installed package, or a module under the job's "
            "--working-dir (or the current directory)"
        ) from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ConfigError(f"model.factory {path!r}: {module_name!r} has no callable {attr!r}")
    return target


def _import(module_name: str) -> Any:
    """Import a module; a top-level name that is not on sys.path is looked for in the current directory too
    (``mlray train`` and ``python jobs/train.py`` do not put it there, and a job's working_dir is the cwd)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        if err.name != module_name.split(".")[0] or cwd in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


@dataclass(frozen=True)
class FactoryCode:
    """Where a factory's source lives: ``root`` is the sys.path entry, ``top`` its top-level package or module."""

    root: Path
    top: Path


def factory_code(path: str) -> FactoryCode | None:
    """The source to ship with a model built by ``path``; None for mlray's own factories and installed packages
    (those must be installed wherever the model loads)."""
    top_name = path.partition(":")[0].split(".")[0]
    if top_name == "mlray":
        return None
    resolve_factory(path)  # imports it
    top_module = sys.modules[top_name]
    locations = list(getattr(top_module, "__path__", []))
    top = Path(locations[0]) if locations else Path(str(top_module.__file__))
    if {"site-packages", "dist-packages"} & set(top.resolve().parts):
        return None
    return FactoryCode(root=top.parent.resolve(), top=top.resolve())


def _check_call(path: str, factory: Callable[..., Any], spec: ModelSpec) -> None:
    try:
        inspect.signature(factory).bind(num_features=spec.num_features, num_outputs=spec.num_outputs, **spec.kwargs)
    except TypeError as err:
        raise ConfigError(
            f"model.factory {path!r} cannot be called as {path.rpartition(':')[2]}(num_features=..., "
            f"num_outputs=..., **model.kwargs) with model.kwargs {spec.kwargs}: {err}"
        ) from None
    except ValueError:
        pass  # no signature to inspect (a builtin): the call itself will tell


class StandardizedModel(nn.Module):
    """Standardisation, the factory's module, and for regression the targets' scale; (B, F) -> (B, K).

    For regression the module learns standardised targets and ``target`` (the training split's target mean
    and std, buffers like ``standardize``'s) maps them back, so a user's module needs no idea of the scale.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        factory = resolve_factory(spec.factory)
        _check_call(spec.factory, factory, spec)
        try:
            body = factory(num_features=spec.num_features, num_outputs=spec.num_outputs, **spec.kwargs)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's factory failed: say which and with what
            raise ConfigError(f"model.factory {spec.factory!r} failed with num_features={spec.num_features}, "
                              f"num_outputs={spec.num_outputs}, model.kwargs {spec.kwargs}: "
                              f"{type(err).__name__}: {err}") from None
        if not isinstance(body, nn.Module):
            raise ConfigError(f"model.factory {spec.factory!r} returned {type(body).__name__}, not a torch nn.Module")
        self.spec = spec
        self.standardize = Standardize(spec.num_features)
        self.body = body
        self.target = Standardize(spec.num_outputs) if spec.task == "regression" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(self.standardize(x))  # (B, K)
        if self.target is not None:
            out = out * self.target.std + self.target.mean
        return out


Classifier = StandardizedModel  # the name before regression existed


def build(spec: ModelSpec) -> StandardizedModel:
    return StandardizedModel(spec)


def check_model(spec: ModelSpec) -> StandardizedModel:
    """Build the model and run one forward pass on two rows, so that a factory that does not import, does not
    take the arguments, or maps to the wrong shape fails on the driver, before any worker starts."""
    model = build(spec)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, spec.num_features))
    except Exception as err:  # noqa: BLE001 - the user's module failed on a well-formed batch
        raise ConfigError(f"model.factory {spec.factory!r}: the module fails on a (2, {spec.num_features}) float32 "
                          f"batch: {type(err).__name__}: {err}") from None
    expected = (2, spec.num_outputs)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = "class logits" if spec.task == "classification" else "target values"
        raise ConfigError(f"model.factory {spec.factory!r}: the module maps a (2, {spec.num_features}) batch to "
                          f"{got}; {spec.task} needs (N, {spec.num_outputs}) {what}")
    return model


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Removed: a name registered in one process was unknown to Train workers, Serve replicas and MLflow."""
    raise ConfigError(f"mlray.models.register({name!r}) is gone: name the function in the job config instead, "
                      "model.factory: 'package.module:function' with model.kwargs (see docs/models.md)")
