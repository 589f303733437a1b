"""A serving app without Ray, for unit tests: the real route table, core, middlewares and a small real model."""

from __future__ import annotations

from typing import Any

import torch

from mlray.artifact import LoadedModel
from mlray.models import ModelSpec, build
from mlray.registry import VersionInfo
from mlray.serving.app import build_api
from mlray.serving.auth import KeyGuard, hash_key
from mlray.serving.config import ServeAppConfig
from mlray.serving.core import PredictionCore
from mlray.serving.loader import ServedModel

FEATURES = [f"pixel_{i}" for i in range(8)]
CLASSES = ["zero", "one", "two"]
KEY = "test-key"


def served_model(version: int = 3, *, seed: int = 0) -> ServedModel:
    torch.manual_seed(seed)
    model = build(ModelSpec(factory="mlray.models:mlp", num_features=len(FEATURES), num_outputs=len(CLASSES),
                            kwargs={"hidden": [16]}))
    model.eval()
    loaded = LoadedModel(model=model, feature_names=list(FEATURES), class_names=list(CLASSES), meta={})
    info = VersionInfo(name="digits", version=version, run_id="run-1", source="models:/m-1", aliases=["champion"],
                       tags={})
    return ServedModel(loaded=loaded, info=info, alias="champion", load_seconds=0.1)


class Versions:
    """What a replica's Follower holds, kept in memory."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        self.models = models
        self.failures: dict[str, str] = {}
        self.shadows: list[dict[str, Any]] = []
        self.calls: list[tuple[str, int, bool]] = []
        self.challenger_weight: float | None = None

    def record_shadow(self, record: dict[str, Any]) -> None:
        self.shadows.append(record)

    def record_call(self, role: str, version: int, seconds: float, *, ok: bool) -> None:
        self.calls.append((role, version, ok))

    async def rollout_status(self) -> dict[str, Any]:
        return {"targets": {"champion": self.models["champion"].info.version}}


def make_app(*, auth: bool = False, fast_path: bool = True, **settings: Any) -> tuple[Any, PredictionCore]:
    cfg = ServeAppConfig.model_validate({"model": "digits", "max_rows": 16, **settings})
    core = PredictionCore(cfg, Versions({"champion": served_model()}))
    guard = KeyGuard()
    guard.configure(enabled=auth, hashes=[hash_key(KEY)] if auth else [])
    app = build_api(core=lambda: core, guard=lambda: guard, fast=lambda: core if fast_path else None)
    return app, core
