"""The `mlray` command as a person meets it: one-line errors with exit code 1 for every failure a user can
cause, 2 only for usage errors, JSON that parses, model URIs, and a progress display on terminals only.
No Ray cluster: every command here fails (or answers) before it would need one."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, printed_lines

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Runs `mlray ARGS` in this process (the same `run` that `main` exits with); returns (code, out, err)."""
    monkeypatch.setenv("MLRAY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLRAY_ARTIFACT_ROOT", raising=False)  # set by a Ray head an earlier test started here
    monkeypatch.delenv("MLRAY_API_KEY", raising=False)
    from mlray.cli import run

    def invoke(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = run(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def _one_error_line(err: str) -> str:
    lines = printed_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_refused_connection(cli):
    port = free_port()
    code, _, err = cli("predict", "digits", "--instances", "[[1, 2]]", "--url", f"http://127.0.0.1:{port}")
    assert code == 1
    assert f"cannot connect to http://127.0.0.1:{port}/v1/models/digits:predict" in _one_error_line(err)


def test_missing_instances_file(cli, tmp_path):
    code, _, err = cli("predict", "digits", "--instances", f"@{tmp_path / 'rows.json'}")
    assert code == 1 and f"no such file: {tmp_path / 'rows.json'}" in _one_error_line(err)


def test_instances_that_are_not_json(cli, tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text("[[1, 2")
    code, _, err = cli("predict", "digits", "--instances", f"@{rows}")
    assert code == 1 and f"file {str(rows)!r} is not JSON" in _one_error_line(err)


def test_missing_config_file(cli, tmp_path):
    code, _, err = cli("promote", "digits", "--version", "1", "-c", str(tmp_path / "job.yaml"))
    assert code == 1 and "does not exist" in _one_error_line(err)


def test_mlray_error(cli):
    code, _, err = cli("promote", "digits", "--version", "9")
    assert code == 1 and _one_error_line(err) == "error: registered model 'digits' has no version 9"


def test_mlflow_error(cli, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    code, _, err = cli("models")
    assert code == 1 and _one_error_line(err).startswith("error: MLflow: ")


def test_a_dashboard_that_does_not_answer(cli):
    port = free_port()
    code, _, err = cli("status", "digits", "--address", f"http://127.0.0.1:{port}")
    line = _one_error_line(err)
    assert code == 1 and f"--address 'http://127.0.0.1:{port}' is not a Ray dashboard that answers" in line


def test_a_bad_model_uri(cli):
    code, _, err = cli("predict", "models:/digits@@x", "--instances", "[]")
    assert code == 1 and "is not a model name, models:/NAME@ALIAS or models:/NAME/VERSION" in _one_error_line(err)


@pytest.mark.parametrize("args", [("predict", "digits"), ("no-such-command",), ("promote",)])
def test_usage_errors_exit_2(cli, args):
    code, _, err = cli(*args)
    assert code == 2 and "Usage: mlray" in err


def test_version(cli):
    from importlib import metadata

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"mlray {metadata.version('mlray')}"


def test_models_json_parses_and_names_the_gate_metric(cli, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("registry:\n  gate:\n    metric: val_loss\n    direction: minimize\n")
    code, out, _ = cli("models", "--json", "-c", str(job))
    assert code == 0 and json.loads(out) == {"gate_metric": "val_loss", "models": []}


def test_models_shows_the_gate_metric(cli, tmp_path):
    """A registered version whose run logged val_loss: `mlray models` shows the metric the gate compares."""
    import mlflow

    from mlray import settings
    from mlray.registry import register

    mlflow.set_tracking_uri(settings.tracking_uri())
    with mlflow.start_run() as run:
        mlflow.log_metric("val_loss", 0.125)
        mlflow.log_metric("test_accuracy", 0.5)
    register("digits", model_uri=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id, tags={})
    job = tmp_path / "job.yaml"
    job.write_text("registry:\n  gate:\n    metric: val_loss\n    direction: minimize\n")
    code, out, _ = cli("models", "-c", str(job))
    assert code == 0 and "val_loss=0.1250" in out and "test_accuracy" not in out
    code, out, _ = cli("models", "--json")
    listed = json.loads(out)
    assert listed["gate_metric"] == "test_accuracy" and listed["models"][0]["versions"][0]["version"] == 1
    code, out, _ = cli("promote", "models:/digits/1", "--json")  # the version from the URI
    assert code == 0 and json.loads(out)["version"] == 1


@pytest.mark.parametrize("kind", ["job", "serve"])
def test_schema_is_json_schema_of_the_config(cli, kind, tmp_path):
    code, out, _ = cli("schema", kind)
    schema = json.loads(out)
    assert code == 0 and schema["$schema"].startswith("https://json-schema.org/")
    assert ("train" if kind == "job" else "alias") in schema["properties"]
    target = tmp_path / "schema.json"
    assert cli("schema", kind, "--out", str(target))[0] == 0 and json.loads(target.read_text()) == schema


def test_api_key_is_sent_from_the_option_or_the_environment(cli, monkeypatch):
    """A loopback server that answers 401 unless it gets the key: the key from --api-key and $MLRAY_API_KEY."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Guarded(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("content-length", 0)))
            ok = self.headers.get("authorization") == "Bearer s3cret"
            body = json.dumps({"predictions": [1]} if ok else {"error": "this route needs an API key"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Guarded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, _, err = cli("predict", "digits", "--instances", "[[1]]", "--url", url)
        assert code == 1 and "401" in _one_error_line(err)
        code, out, _ = cli("predict", "digits", "--instances", "[[1]]", "--url", url, "--api-key", "s3cret")
        assert code == 0 and json.loads(out) == {"predictions": [1]}
        monkeypatch.setenv("MLRAY_API_KEY", "s3cret")
        code, out, _ = cli("predict", "models:/digits@champion", "--instances", "[[1]]", "--url", url, "--json")
        assert code == 0 and json.loads(out) == {"predictions": [1]}
    finally:
        server.shutdown()


@pytest.mark.parametrize(("text", "expected"), [
    ("digits", ("digits", None, None)),
    ("models:/digits@champion", ("digits", "champion", None)),
    ("models:/digits/3", ("digits", None, 3)),
])
def test_model_refs(text, expected):
    from mlray.registry import parse_model_ref

    ref = parse_model_ref(text)
    assert (ref.name, ref.alias, ref.version) == expected


PROGRESS = "from mlray.cli.console import progress\nwith progress('training', total=3) as step:\n" \
           "    for n in range(3): step(f'epoch {n + 1}/3')\nprint('done')\n"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "COLUMNS": "100"}


def test_progress_appears_on_a_terminal():
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", PROGRESS], stdin=follower, stdout=follower, stderr=follower,
                            env=_env(), cwd=ROOT)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the pty closes when the process ends
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=60) == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in shown and "━" in shown and "3/3" in shown, shown  # a live bar, redrawn in place
    assert "done" in shown


def test_no_progress_display_when_piped():
    done = subprocess.run([sys.executable, "-c", PROGRESS], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == "done\n"
    assert done.stderr.splitlines() == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]  # plain lines, no bar
    assert "\x1b[" not in done.stderr


def test_address_takes_a_dashboard_url(tmp_path, monkeypatch):
    """The dashboard URL of the head mlray started resolves to its recorded GCS address; another dashboard
    (here a loopback server answering /api/version as Ray's does) to its host's GCS port; a GCS address as is."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mlray import cluster

    monkeypatch.setenv("MLRAY_HOME", str(tmp_path))
    (tmp_path / "cluster.json").write_text(json.dumps({"address": "10.1.2.3:6380",
                                                       "dashboard_url": "http://127.0.0.1:8265"}))
    assert cluster.resolve_address("http://localhost:8265/") == "10.1.2.3:6380"
    assert cluster.resolve_address("10.0.0.9:6379") == "10.0.0.9:6379"
    assert cluster.resolve_address(None) is None

    class Dashboard(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = json.dumps({"version": "5", "ray_version": "2.60.0"}).encode()
            self.send_response(200 if self.path == "/api/version" else 404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert cluster.resolve_address(f"http://127.0.0.1:{server.server_address[1]}") == "127.0.0.1:6379"
    finally:
        server.shutdown()
