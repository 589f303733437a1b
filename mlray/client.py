"""A small HTTP client for a served model (``mlray predict``, the quickstart, tests)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mlray.errors import MlrayError


def predict(url: str, model: str, instances: list[list[float]] | np.ndarray, *, timeout_s: float = 30.0,
            headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST ``{"instances": ...}`` to ``{url}/v1/models/{model}:predict``; returns the JSON answer."""
    import requests

    rows = instances.tolist() if isinstance(instances, np.ndarray) else instances
    response = requests.post(f"{url.rstrip('/')}/v1/models/{model}:predict", json={"instances": rows},
                             timeout=timeout_s, headers=headers)
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code != 200:
        raise MlrayError(f"{response.status_code} from {url}: {body.get('error', response.text[:200])}")
    return body
