"""Every shell block of README.md and docs/*.md, run as written and in order, on the head `make quickstart`
started (tests/docs/conftest.py), from a shell that has not activated the venv.

A block passes when it exits with the status its page gives (0 unless ``exit_code`` says otherwise) and
prints what its page shows after it. Blocks that stop the head (``mlray down``, ``make down``) run last.
Blocks that cannot run on one machine carry ``pytest.mark.skip`` with a reason the reader sees
(tests/docs/test_pages.py checks that).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.docs.blocks import ROOT, Block, blocks, output_matches, pages
from tests.docs.conftest import SETUP, DocsSession, head_auth_env, head_record, makefile_runs
from tests.docs.pictures import GENERATED, screenshot
from tests.helpers import SteadyLoad, ray_processes, wait_for

pytestmark = pytest.mark.integration

ALL = [block for page in pages() for block in blocks(page)]
STOPS_HEAD = re.compile(r"^\s*(mlray|make) down\b", re.M)
STOPS = [block for block in ALL if STOPS_HEAD.search(block.code)]
RUN = [block for block in ALL if block not in STOPS]
SERVE_URL = "http://127.0.0.1:8000"
DEPLOYS = re.compile(r"^\s*(serve (deploy|run)|mlray serve)\b", re.M)
BIN = Path(sys.executable).parent


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return 0


def params(found: list[Block]) -> list:
    return [pytest.param(block, marks=block.marks, id=block.id) for block in found]


def run_block(block: Block, docs: DocsSession) -> str:
    foreground, shot = block.mark("foreground"), block.mark("screenshot")
    if block.code.strip() == SETUP:  # the tier's own set-up ran exactly this block, in this shell
        status, output = 0, docs.setup_output
    elif foreground is not None:
        def while_ready() -> None:
            if DEPLOYS.search(block.code):
                wait_apps_running(block.id)
            if answers := foreground.kwargs.get("answers"):
                wait_for(lambda: _status(answers) == 200, timeout=foreground.kwargs.get("seconds", 120),
                         what=f"{answers} answering 200 while `{block.code.strip()}` runs")
            if shot is not None:
                screenshot(shot.kwargs["url"], GENERATED / f"{shot.kwargs['name']}.png",
                           wait_ms=shot.kwargs.get("wait_ms", 6000), size=shot.kwargs.get("size", "1280,800"))

        ready = foreground.kwargs["ready"]
        seen, output = docs.shell.run_foreground(block.code, ready=ready,
                                                 seconds=foreground.kwargs.get("seconds", 120),
                                                 while_ready=while_ready)
        assert seen, f"{block.id}: `{ready}` never appeared:\n{block.code}\n---\n{output[-4000:]}"
        status = 0
    elif (load_mark := block.mark("under_load")) is not None:
        with SteadyLoad(load_mark.kwargs["url"], row=[0.0] * 64, threads=2, pause_s=0.02, max_seconds=900,
                        max_requests=200_000) as load:
            wait_for(lambda: load.count() > 20, timeout=60, what=f"{block.id}: traffic before the block")
            done = docs.shell.run(block.code)
        status, output = done.returncode, done.stdout
        versions = {version for code, version, _ in load.results if code == 200}
        assert load.failures() == [], f"{block.id}: requests failed while it ran: {load.failures()[:5]}"
        assert len(versions) >= load_mark.kwargs.get("versions", 1), (
            f"{block.id}: answers came from versions {versions} ({load.count()} requests)")
    else:
        done = docs.shell.run(block.code)
        status, output = done.returncode, done.stdout
    exit_code = block.mark("exit_code")
    expected = exit_code.args[0] if exit_code is not None else 0
    assert status == expected, (f"{block.id}: exit {status}, the page expects {expected}\n$ {block.code}\n"
                                f"---\n{output[-5000:]}")
    if block.expected_output is not None:
        assert output_matches(block.expected_output, output), (
            f"{block.id}: the output differs from what the page shows\n$ {block.code}\n--- page:\n"
            f"{block.expected_output}\n--- got:\n{output[-5000:]}")
    if foreground is None and expected == 0 and DEPLOYS.search(block.code):
        # `serve deploy` returns once Serve has the config; the app builds after. A page that shows a deploy
        # promises an app that runs.
        wait_apps_running(block.id)
    docs.ran.append(block.code)
    return output


@pytest.mark.parametrize("block", params(RUN))
def test_block(block: Block, docs: DocsSession) -> None:
    run_block(block, docs)


def serve(*args: str) -> str:
    """Serve's CLI, from the repository root, with the head's token; its stdout."""
    done = subprocess.run([str(BIN / "serve"), *args], capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, **head_auth_env()})
    assert done.returncode == 0, f"serve {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


def serve_status() -> dict:
    """`serve status`'s applications: {name: {status, message, ...}}."""
    return yaml.safe_load(serve("status")).get("applications") or {}


def wait_apps_running(what: str, timeout: float = 300) -> None:
    """Until every Serve app is RUNNING; a DEPLOY_FAILED one fails at once, with Serve's message."""
    deadline = time.monotonic() + timeout
    while True:
        apps = serve_status()
        failed = {name: app.get("message", "") for name, app in apps.items()
                  if app.get("status") == "DEPLOY_FAILED"}
        assert not failed, f"{what}: Serve says DEPLOY_FAILED: {failed}"
        if apps and all(app.get("status") == "RUNNING" for app in apps.values()):
            return
        assert time.monotonic() < deadline, f"{what}: Serve apps not RUNNING within {timeout} s: {apps}"
        time.sleep(2)


def test_the_quickstart_model_predicts_the_test_images(docs: DocsSession) -> None:
    """`make quickstart` sends five real test images to the served model; at least four come back right."""
    accuracy = float(re.search(r"Test accuracy:\s+([0-9.]+)", docs.setup_output).group(1))
    assert accuracy >= 0.95, docs.setup_output[-3000:]
    predictions = re.findall(r"true (\d)\s+predicted (\d)", docs.setup_output)
    assert len(predictions) == 5 and sum(t == p for t, p in predictions) >= 4, predictions


def test_the_local_head_serves_through_haproxy_on_loopback_only(docs: DocsSession) -> None:
    """The README's head runs Serve with HAProxy (mlray.cluster.serve_env); none of its HTTP listeners reach past
    loopback: the frontend, HAProxy's stats and metrics ports (rewritten by mlray's wrapper), the replicas'
    direct ingress ports (30000-31000), the dashboard."""
    from mlray.cluster.listeners import listeners

    found = listeners()
    haproxy = [item for item in found if item.role == "ray-serve-haproxy"]
    assert len(haproxy) >= 3, found  # the frontend, stats, Prometheus
    assert [item for item in haproxy if item.exposed] == []
    assert 8000 in {item.port for item in haproxy}
    direct = [item for item in found if 30000 <= item.port <= 31000]
    assert direct and [item for item in direct if item.exposed] == []
    assert [item for item in found if item.port in (8000, 8265) and item.exposed] == []


def test_a_version_trained_by_ray_job_submit_names_its_job_and_commit(docs: DocsSession) -> None:
    """The README's `ray job submit` block registered a version tagged with its Ray job and git commit."""
    from mlray.registry import list_models

    assert any("ray job submit" in code and "jobs/train.py" in code for code in docs.ran)
    models = list_models(tracking_uri=f"sqlite:///{ROOT / '.mlray' / 'mlflow.db'}")
    versions = [version for model in models if model["name"] == "digits" for version in model["versions"]]
    by_job = [version for version in versions if version["tags"].get("ray.job_id", "").startswith("raysubmit_")]
    assert by_job, [version["tags"] for version in versions]
    assert all(re.fullmatch(r"[0-9a-f]{40}", version["tags"].get("git.commit", "")) for version in by_job), by_job


def test_a_failed_deploy_leaves_the_previous_version_serving(docs: DocsSession, tmp_path) -> None:
    """`serve deploy` of our YAML with an arg the app does not know: the app goes DEPLOY_FAILED with the
    field's name, and the replicas that were serving keep answering with the same version."""
    serve("deploy", "serve_apps/digits.yaml")
    wait_apps_running("serve deploy serve_apps/digits.yaml")
    before = requests.get(f"{SERVE_URL}/v1/models/digits", timeout=10).json()

    good = (ROOT / "serve_apps" / "digits.yaml").read_text()
    bad = tmp_path / "digits-bad.yaml"
    bad.write_text(good.replace("max_rows: 1024", "max_rowz: 1024"))
    assert bad.read_text() != good
    serve("deploy", str(bad))  # Serve takes the config; the app fails to build after
    wait_for(lambda: serve_status()["digits"]["status"] == "DEPLOY_FAILED", timeout=180,
             what="the bad config's DEPLOY_FAILED")
    assert "max_rowz" in serve_status()["digits"]["message"]

    after = requests.get(f"{SERVE_URL}/v1/models/digits", timeout=10)
    assert after.status_code == 200 and after.json()["version"] == before["version"]
    row = [[0.0] * 64]
    answer = requests.post(f"{SERVE_URL}/v1/models/digits:predict", json={"instances": row}, timeout=10)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == str(before["version"])
    # Left as it is: the next test stops the head (a redeploy of the good YAML cost ~50 s here).


def head_processes(home: Path) -> dict[int, dict[str, str]]:
    """Every process of the README's head, by pid, with its environment: each inherits ``ray start``'s, and
    with it the head's state folder (mlray.settings.ray_process_env)."""
    import psutil

    found = {}
    for process in psutil.process_iter():
        try:
            env = process.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get("MLRAY_HOME") == str(home) and "RAY_AUTH_MODE" in env:
            found[process.pid] = env
    return found


def test_every_listener_of_the_quickstart_head_is_loopback_or_refuses_callers_without_the_token(
        docs: DocsSession) -> None:
    """Nothing the README's head exposes to the network runs code for a caller without credentials.

    Every TCP listener of every process of the head is on loopback, or, called from outside without a token,
    refuses: HTTP 401, gRPC UNAUTHENTICATED (tests/listener_probes.py). The only open ones beyond loopback
    serve Prometheus metrics, read-only, and only Ray's metrics roles may (the dashboard's, the autoscaler's
    and each agent's exporter: Ray binds them to the node's address, with no setting; they run nothing).
    """
    from mlray.cluster.listeners import EXPOSED_BY_DESIGN, LOOPBACK, WILDCARD, listeners
    from tests.listener_probes import OPEN_READ_ONLY, how_it_refuses

    record = head_record()
    assert record["auth_mode"] == "token", record
    processes = head_processes(ROOT / ".mlray")
    assert {env["RAY_AUTH_MODE"] for env in processes.values()} == {"token"}, processes.keys()
    node_ip = record["address"].rsplit(":", 1)[0]
    # The head's processes by their environment, and any Ray process by its role (the tier runs one head).
    found = [item for item in listeners() if item.pid in processes or item.role.startswith("ray-")]
    assert {"ray-gcs", "ray-raylet", "ray-dashboard", "ray-client-server", "ray-serve-haproxy"} <= {
        item.role for item in found}, found
    answers = {}
    for item in found:
        if item.reach == LOOPBACK:
            continue
        assert item.role in EXPOSED_BY_DESIGN, item
        address = node_ip if item.reach == WILDCARD else item.address.removeprefix("::ffff:")
        answers[f"{item.role}@{item.address}:{item.port}"] = how_it_refuses(item.role, address, item.port)
    print("\nthe quickstart head's listeners beyond loopback, called without a token:\n  " + "\n  ".join(
        f"{where}: {answer}" for where, answer in sorted(answers.items())))
    assert answers, "no listener beyond loopback: the audit found nothing to call"
    assert not [where for where, answer in answers.items() if answer.startswith("ANSWERED")], answers
    open_ones = {where.split("@")[0] for where, answer in answers.items() if answer == OPEN_READ_ONLY}
    assert open_ones <= {"ray-dashboard", "ray-autoscaler", "ray-dashboard-agent"}, answers
    refused = {where.split("@")[0] for where, answer in answers.items() if answer != OPEN_READ_ONLY}
    assert {"ray-gcs", "ray-raylet", "ray-client-server"} <= refused, answers


def test_the_readme_cli_commands_send_the_token_and_are_refused_without_it(docs: DocsSession,
                                                                           tmp_path: Path) -> None:
    """From a fresh shell that only activated the venv, as the README's blocks ran: `ray` and `serve` reach
    the head through the dashboard with the token the venv's hook hands them; with token auth off, the
    same commands are refused."""
    from tests.docs.blocks import Shell

    shell = Shell(home=tmp_path / "home", state=tmp_path / "shell")
    jobs = "ray job list --address http://127.0.0.1:8265"
    done = shell.run(f"source .venv/bin/activate\n{jobs}\nserve status\nray get-auth-token", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert open(head_auth_env()["RAY_AUTH_TOKEN_PATH"]).read() in done.stdout  # the token the head runs with
    for command in (jobs, "serve status"):
        refused = shell.run(f"source .venv/bin/activate\nRAY_AUTH_MODE=disabled {command}", timeout=300)
        assert refused.returncode != 0, f"{command} without the token: {refused.stdout[-3000:]}"
        assert "401" in refused.stdout or "Authentication required" in refused.stdout, refused.stdout[-3000:]


@pytest.mark.parametrize("block", params(STOPS))
def test_stop_block(block: Block, docs: DocsSession) -> None:
    run_block(block, docs)
    wait_for(lambda: not ray_processes(), timeout=120, what=f"no Ray process after {block.id}")


def cli_table_commands() -> list[str]:
    """`mlray X [Y]` of every row of the CLI table (the page that has one)."""
    rows = [line for page in pages() for line in page.read_text().splitlines() if line.startswith("| `mlray ")]
    assert rows, "no CLI table (rows starting with | `mlray ...`) in README.md or docs/"
    return [" ".join(re.match(r"\| `mlray ((?:[a-z][a-z-]* ?)+)", row).group(1).split()) for row in rows]


def test_every_command_of_the_cli_table_ran(docs: DocsSession) -> None:
    ran = "\n".join(docs.ran)
    for target in ("quickstart", "down"):  # `make quickstart` and `make down` run `mlray quickstart` and `mlray down`
        if re.search(rf"^\s*make {target}\b", ran, re.M) and f"mlray {target}" in makefile_runs(target):
            ran += f"\nmlray {target}"
    missing = [command for command in cli_table_commands()
               if not re.search(rf"(^|[\s;&|(]){re.escape('mlray ' + command)}\b", ran, re.M)]
    assert not missing, f"commands of the CLI table that no docs block ran: {missing}"
