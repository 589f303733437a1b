"""Where mlray keeps its state, and the environment it gives every Ray process it starts.

The embedded default keeps everything under one folder, ``<project>/.mlray``: the MLflow SQLite store,
the artifacts, Train checkpoints and the record of the local Ray cluster that mlray started. The folder is
resolved to an absolute path once, because under ``ray job submit --working-dir .`` the job runs in a
throwaway copy of the project, and a relative path would put the record there.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlray._ray.env import TRAIN_ENV, train_env

HOME_ENV = "MLRAY_HOME"

RAY_ENV_DEFAULTS = TRAIN_ENV  # the Ray Train knobs (mlray/_ray/env.py)


def editable_source_root() -> Path | None:
    """The source checkout mlray is installed from in editable mode, if it is."""
    try:
        text = metadata.distribution("mlray").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    info = json.loads(text)
    if not info.get("dir_info", {}).get("editable"):
        return None
    parsed = urlparse(info.get("url", ""))
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def home() -> Path:
    """The absolute folder that holds mlray's local state.

    ``$MLRAY_HOME`` if set; else ``.mlray`` in the source checkout mlray is installed from (editable
    install, the usual case for a project); else ``.mlray`` in the current directory.
    """
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().resolve()
    root = editable_source_root()
    return ((root if root is not None else Path.cwd()) / ".mlray").resolve()


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a SQLite store in :func:`home`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root() -> str:
    """Where new experiments put their artifacts: an absolute local folder unless configured otherwise."""
    return os.environ.get("MLRAY_ARTIFACT_ROOT") or (home() / "artifacts").as_uri()


def checkpoint_root() -> Path:
    return home() / "checkpoints"


def ray_token_path() -> Path:
    """The token of the local head mlray starts (created on first use, mode 0600: mlray/_ray/auth.py)."""
    return home() / "secrets" / "ray_token"


def ray_auth_env() -> dict[str, str]:
    """How the Ray processes mlray starts and the Ray clients it runs authenticate.

    The caller's own choice when it made one: ``MLRAY_RAY_AUTH_MODE`` (set on cluster nodes), else
    ``RAY_AUTH_MODE``, else Ray's token variables (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``: token auth
    with that token). Otherwise token auth with mlray's own token (:func:`ray_token_path`): the local head
    then refuses every caller without it, on every port Ray opens beyond loopback. Always explicit, so a
    stray ``~/.ray/auth_token`` never decides the mode.
    """
    chosen = os.environ.get("MLRAY_RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_MODE")
    if chosen:
        return {"RAY_AUTH_MODE": chosen}
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return {"RAY_AUTH_MODE": "token"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_path())}


def ray_process_env() -> dict[str, str]:
    """Environment for Ray processes mlray starts (``ray start``, ``ray.init``) and Ray CLIs it calls."""
    env = train_env()
    env.update(ray_auth_env())
    env[HOME_ENV] = str(home())
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    env["MLRAY_ARTIFACT_ROOT"] = artifact_root()
    return env
