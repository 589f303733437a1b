"""Compressed variants behind the Serve app: an int8 and an ONNX variant of the trained digits model, each
served through an alias, answer 1,000 requests with the labels the offline variant gives, and say which
variant answered (header and metadata)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from tests.conftest import deploy_app, register_copy

pytestmark = pytest.mark.integration

REQUESTS = 1000
VARIANTS = {"dynamic-int8": "champion-int8", "onnx": "champion-onnx"}
# Dynamic int8 quantizes each call's activations with that call's own range, so a row's answer depends on the
# rows it shares a forward pass with: its app answers one row per call, and the offline variant is asked row
# by row. The ONNX variant's answers do not depend on the batch: its app batches as deployed by default.
APP_ARGS = {"dynamic-int8": {"batching": {"enabled": False}}, "onnx": {}}


@pytest.fixture(scope="module")
def variant_apps(trained, serve_port):
    from mlray.compress import compress
    from mlray.registry import promote

    parent = register_copy("cmp", trained)  # the trained run's files and data params, as a model of its own
    apps = {}
    for method, alias in VARIANTS.items():
        result = compress("cmp", version=parent, method=method)
        promote("cmp", version=result.version, alias=alias)
        app = f"cmp-{method}"
        args = {"model": "cmp", "alias": alias, **APP_ARGS[method]}
        apps[method] = (deploy_app(app, args, port=serve_port), result.version, alias)
    yield apps
    from ray import serve

    for method in VARIANTS:
        serve.delete(f"cmp-{method}")


def _rows() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32)[:REQUESTS]  # (1000, 64)


@pytest.mark.parametrize("method", list(VARIANTS))
def test_a_served_variant_answers_as_the_offline_variant(variant_apps, method):
    from mlray.serving.loader import load_registered

    url, version, alias = variant_apps[method]
    x = _rows()
    offline = load_registered("cmp", alias=alias).loaded
    assert offline.variant == method
    if APP_ARGS[method].get("batching", {}).get("enabled", True):
        probabilities = offline.predict(x)
    else:
        probabilities = np.concatenate([offline.predict(row[None]) for row in x])
    wanted = [offline.class_names[i] for i in probabilities.argmax(1)]

    local = threading.local()

    def ask(row: np.ndarray) -> tuple[str, str, str]:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        answer = session.post(f"{url}/v1/models/cmp:predict", json={"instances": [row.tolist()]}, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()["labels"][0], answer.headers["x-model-variant"], answer.headers["x-model-version"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, x))
    assert len(answers) == REQUESTS
    assert [label for label, _, _ in answers] == wanted
    assert {(variant, served) for _, variant, served in answers} == {(method, str(version))}

    meta = requests.get(f"{url}/v1/models/cmp", timeout=10)
    assert meta.json()["variant"] == method and meta.json()["version"] == version
    assert meta.headers["x-model-variant"] == method
