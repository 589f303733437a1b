"""Real clients over a real socket, against the real ASGI app (route table, core, middlewares, a small real model)
behind uvicorn, without Ray: schemathesis with all its checks over /openapi.json (every answer documented, every
documented body accepted, every body outside the document refused), and tritonclient.http with its defaults.
tests/integration/test_serving_protocols.py runs both against a deployed app."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for
from tests.unit.serving_app import KEY, make_app

# A request over the row limit is refused with 413 (Content Too Large), the status proxies use for it;
# schemathesis' negative-data check lists the other 4xx only by default.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
"""


def run_schemathesis(url: str, tmp_path: Path, *, key: str, max_examples: int, max_time_s: int,
                     phases: str = "examples,coverage,fuzzing,stateful") -> subprocess.CompletedProcess:
    """``schemathesis run --checks all`` over ``url`` with the API key; bounded in examples and time."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cli = Path(sys.executable).with_name("schemathesis")
    return subprocess.run(
        [str(cli), "--config-file", str(config), "run", url, "--checks", "all", "-H", f"Authorization: Bearer {key}",
         "--max-examples", str(max_examples), "--max-time", str(max_time_s), "--seed", "1", "--workers", "1",
         "--no-color", "--request-timeout", "30", "--phases", phases],
        capture_output=True, text=True, timeout=max_time_s + 120, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""})


@pytest.fixture(scope="module")
def served_app():
    import uvicorn

    app, _ = make_app(auth=True)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30, what="uvicorn started")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
def test_schemathesis_all_checks_pass(served_app, tmp_path):
    result = run_schemathesis(f"{served_app}/openapi.json", tmp_path, key=KEY, max_examples=10, max_time_s=25)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout or "passed" in result.stdout, result.stdout[-3000:]


def test_tritonclient_over_http_with_its_defaults(served_app):
    """The real client over a real socket (geventhttpclient): binary tensors in and out, metadata, as V1 answers."""
    import numpy as np
    import requests
    import tritonclient.http as httpclient

    from tests.unit.serving_app import FEATURES

    headers = {"Authorization": f"Bearer {KEY}"}
    client = httpclient.InferenceServerClient(served_app.removeprefix("http://"))
    try:
        assert client.get_server_metadata(headers=headers)["extensions"] == ["binary_tensor_data"]
        assert client.get_model_metadata("digits", headers=headers)["inputs"][0]["shape"] == [-1, len(FEATURES)]
        assert client.is_server_ready() and client.is_model_ready("digits")
        x = np.random.default_rng(1).uniform(0, 16, size=(7, len(FEATURES))).astype(np.float32)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("digits", [tensor], headers=dict(headers))  # it adds to the dict it is given
        v1 = requests.post(f"{served_app}/v1/models/digits:predict", json={"instances": x.tolist()}, headers=headers,
                           timeout=10).json()
        np.testing.assert_allclose(result.as_numpy("probabilities"), np.asarray(v1["predictions"]), atol=1e-6)
        assert [label.decode() for label in result.as_numpy("label")] == v1["labels"]
        with pytest.raises(httpclient.InferenceServerException, match="needs an API key"):
            client.infer("digits", [tensor])
    finally:
        client.close()
