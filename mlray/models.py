"""Model architectures by name.

Every architecture starts with a :class:`Standardize` layer whose mean and std are buffers fitted on the
training split: they travel inside the weights, so serving applies exactly the transform training used.
A new architecture plugs in with ``@register("name")`` and is built from a plain ``ModelSpec`` dict,
which is what gets stored beside the weights (no pickled classes anywhere).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mlray.errors import ConfigError

_ARCHITECTURES: dict[str, Callable[[ModelSpec], nn.Module]] = {}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights."""

    arch: str
    num_features: int
    num_classes: int
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{**data, "hidden": tuple(data.get("hidden", ()))})


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


def register(name: str) -> Callable[[Callable[[ModelSpec], nn.Module]], Callable[[ModelSpec], nn.Module]]:
    def wrap(builder: Callable[[ModelSpec], nn.Module]) -> Callable[[ModelSpec], nn.Module]:
        _ARCHITECTURES[name] = builder
        return builder

    return wrap


def architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


@register("mlp")
def _mlp(spec: ModelSpec) -> nn.Module:
    layers: list[nn.Module] = []
    width = spec.num_features
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(spec.dropout)]
        width = hidden
    layers.append(nn.Linear(width, spec.num_classes))  # (B, H) -> (B, K) logits
    return nn.Sequential(*layers)


@register("cnn")
def _cnn(spec: ModelSpec) -> nn.Module:
    """A small CNN for square single-channel images given as flat rows (digits: 64 = 8x8).

    Enough parameters and FLOPs per sample that DDP's gradient all-reduce and compute are both real,
    so overhead and scaling figures mean something.
    """
    side = int(round(spec.num_features**0.5))
    if side * side != spec.num_features:
        raise ConfigError(f"model.arch 'cnn' needs square images; {spec.num_features} features is not a square")
    channels = spec.hidden[0] if spec.hidden else 32
    width = spec.hidden[1] if len(spec.hidden) > 1 else 128
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),  # (B, F) -> (B, 1, S, S)
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels * 2, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 2C, S/2, S/2)
        nn.Flatten(),
        nn.Dropout(spec.dropout),
        nn.Linear(channels * 2 * (side // 2) ** 2, width), nn.ReLU(),
        nn.Linear(width, spec.num_classes),
    )


class Classifier(nn.Module):
    """Standardisation followed by an architecture's body; forward returns logits (B, K)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.arch not in _ARCHITECTURES:
            raise ConfigError(f"model.arch {spec.arch!r} is not known; choose one of {architectures()}")
        self.spec = spec
        self.standardize = Standardize(spec.num_features)
        self.body = _ARCHITECTURES[spec.arch](spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.standardize(x))


def build(spec: ModelSpec) -> Classifier:
    return Classifier(spec)
