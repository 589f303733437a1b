"""Acceptance (b): a model factory from a package outside mlray (tests/fixtures/userproject/usermodel) is
trained with 2 workers under `ray job submit --working-dir`, registered, served by a Serve app, and loaded by
`mlflow.pyfunc.load_model` in a fresh process that never imported the package; all answer the same.

The module owns its Ray head (started and stopped here) and runs only real processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.helpers import free_port, ray_processes, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
USERPROJECT = ROOT / "tests" / "fixtures" / "userproject"
BIN = Path(sys.executable).parent

# Run in a fresh interpreter whose sys.path has mlray but not the user's project: the package can only come
# from the model's own files.
FRESH = """
import importlib.util, json, sys
import numpy as np
assert importlib.util.find_spec("usermodel") is None, "usermodel must not be importable here"
rows = np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
if sys.argv[1] == "pyfunc":
    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/usermodel/1")
    names = model.metadata.get_input_schema().input_names()
    out = np.asarray(model.predict(pd.DataFrame(rows.astype(np.float64), columns=names)))
else:
    import mlray
    out = mlray.load_model("usermodel", version=1).predict(rows)
print(json.dumps({"out": out.tolist(), "module": sys.modules["usermodel.nets"].__file__}))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("usermodel-home")
    values = {**os.environ, "MLRAY_HOME": str(home), "RAY_AUTH_MODE": "disabled",
              # mlray itself (this checkout) for every process; never the user's project
              "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"}
    values.pop("RAY_ADDRESS", None)
    yield values
    subprocess.run([str(BIN / "mlray"), "down"], env=values, cwd=ROOT, capture_output=True, timeout=180)


def run(args: list[str], env: dict[str, str], *, cwd: Path = ROOT, timeout: int = 600
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def submitted(env):
    head = run([sys.executable, "-c", "from mlray import cluster; print(cluster.start_head(num_cpus=4))"], env)
    assert head.returncode == 0, head.stderr[-3000:]
    done = run([str(BIN / "ray"), "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".",
                "--", "mlray", "train", "--config", "usermodel.yaml", "--json"], env, cwd=USERPROJECT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    found = re.search(r'^\{\n.*?^\}', done.stdout, flags=re.S | re.M)
    assert found, done.stdout[-3000:]
    return json.loads(found.group(0))


@pytest.fixture(scope="module")
def rows():
    from mlray.config import parse_config
    from mlray.training.data import sample_test_rows

    x, y = sample_test_rows(parse_config({}).data, seed=42, count=32)
    return x, y


def fresh(kind: str, x: np.ndarray, env: dict[str, str], tmp_path: Path) -> dict:
    done = run([sys.executable, "-c", FRESH, kind, json.dumps(x.tolist())], env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_trained_with_two_workers_from_the_working_dir_and_registered(submitted, env):
    assert submitted["version"] == 1 and submitted["metrics"]["test_accuracy"] >= 0.9
    from mlflow.tracking import MlflowClient

    mlflow_client = MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    run_ = mlflow_client.get_run(submitted["run_id"])
    assert run_.data.params["model.factory"] == "usermodel.nets:residual_mlp"
    assert len(run_.data.tags["mlray.worker_nodes"].split(",")) == 2
    assert run_.data.tags.get("ray.job_id", "").startswith("raysubmit_")


def test_served_pyfunc_and_loader_agree(submitted, env, rows, tmp_path):
    x, y = rows
    promoted = run([str(BIN / "mlray"), "promote", "usermodel", "--version", "1"], env)
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    port = free_port()
    served = run([str(BIN / "mlray"), "serve", "--model", "usermodel", "--port", str(port)], env)
    assert served.returncode == 0, served.stdout[-2000:] + served.stderr[-3000:]
    answer = requests.post(f"http://127.0.0.1:{port}/v1/models/usermodel:predict",
                           json={"instances": x.tolist()}, timeout=60)
    assert answer.status_code == 200, answer.text
    via_http = np.asarray(answer.json()["predictions"])
    via_pyfunc = fresh("pyfunc", x, env, tmp_path)
    via_loader = fresh("loader", x, env, tmp_path)
    # the package each fresh process used came from the registered model's files
    for got in (via_pyfunc, via_loader):
        assert f"mlray-code{os.sep}" in got["module"] and "userproject" not in got["module"], got["module"]
    np.testing.assert_allclose(np.asarray(via_pyfunc["out"]), via_http, atol=1e-5)
    np.testing.assert_allclose(np.asarray(via_loader["out"]), via_http, atol=1e-5)
    assert (via_http.argmax(1) == y).mean() >= 0.85


def test_down_leaves_nothing_running(submitted, env):
    down = run([str(BIN / "mlray"), "down"], env, timeout=180)
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not ray_processes(), timeout=60, what="every Ray process gone")
