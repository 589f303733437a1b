"""Every test gets its own mlray home (MLflow store, artifacts, checkpoints) under pytest's tmp dir,
and Ray's auth mode is set explicitly instead of being inherited from the machine."""

from __future__ import annotations

import os

import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def mlray_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    home = tmp_path_factory.mktemp("mlray-home")
    os.environ["MLRAY_HOME"] = str(home)
    return str(home)
