"""The docs tier's one head: `make quickstart` in a clean shell, then every page's blocks, then `make down`.

The shell has nothing of the test process (``env -i HOME=<fresh home> PATH=/usr/bin:/bin``): no venv on
PATH, no ``MLRAY_HOME``, no ``RAY_AUTH_MODE``. So the README's commands run as a reader who has just
cloned the repository would run them, with the local state folder in the checkout (``.mlray/``), as the
README says. A ``.mlray/`` already there is moved aside for the run and put back afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest

from tests.docs.blocks import ROOT, Shell
from tests.docs.pictures import GENERATED, copy_run_report, screenshot, with_headers
from tests.helpers import ray_processes, wait_for

SETUP = "make quickstart"
TEARDOWN = "make down"


def pytest_configure(config: pytest.Config) -> None:
    for line in ("exit_code(n): the docs block must end with status n",
                 "foreground(ready, seconds): the docs block runs a server; Ctrl-C once it prints `ready`",
                 "screenshot(url, name): a picture of url while the foreground block runs",
                 "under_load(url, versions): steady single-row requests to url while the block runs; none may fail"):
        config.addinivalue_line("markers", line)


@dataclass
class DocsSession:
    shell: Shell
    setup_output: str
    ran: list[str] = field(default_factory=list)  # code of every block that passed


@pytest.fixture(scope="package")
def docs(tmp_path_factory: pytest.TempPathFactory):
    if ray_processes():
        pytest.fail("the docs tier starts the README's head on 127.0.0.1:8265, but Ray is already running "
                    "here; stop it first (`mlray down` or `ray stop`)")
    state = ROOT / ".mlray"
    saved = ROOT / ".mlray.saved-by-docs-tier"
    if state.exists():
        state.rename(saved)
    shell = Shell(home=tmp_path_factory.mktemp("home"), state=tmp_path_factory.mktemp("shell"))
    GENERATED.mkdir(parents=True, exist_ok=True)
    try:
        done = shell.run(SETUP, timeout=1200)
        output = done.stdout
        assert done.returncode == 0, f"`{SETUP}` failed (exit {done.returncode}):\n{output[-4000:]}"
        copy_run_report(state / "artifacts", GENERATED)
        # The head runs with token auth: the dashboard asks a browser for the token once (a cookie after).
        with with_headers("http://127.0.0.1:8265", head_bearer()) as dashboard:
            screenshot(f"{dashboard}/#/overview", GENERATED / "ray-dashboard.png", wait_ms=8000)
        yield DocsSession(shell, output)
    finally:
        stopped = shell.run(f'cd "{ROOT}"\n{TEARDOWN}', timeout=300)  # a page may have left the shell elsewhere
        try:
            wait_for(lambda: not ray_processes(), timeout=120, what="every Ray process gone after `make down`")
        except TimeoutError as err:
            raise TimeoutError(f"{err}; still running: {ray_processes()[:10]}") from None
        if saved.exists():
            shutil.rmtree(state, ignore_errors=True)
            saved.rename(state)
        assert stopped.returncode == 0, stopped.stdout


def head_record() -> dict:
    """What mlray recorded about the head `make quickstart` started (.mlray/cluster.json)."""
    return json.loads((ROOT / ".mlray" / "cluster.json").read_text())


def head_auth_env() -> dict[str, str]:
    """How a process of this test reaches the README's head: with its token, as the venv's hook gives the
    shell's commands (this process itself runs with RAY_AUTH_MODE=disabled, the test clusters' mode)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head_record()["token_path"]}


def head_bearer() -> dict[str, str]:
    token = open(head_auth_env()["RAY_AUTH_TOKEN_PATH"]).read().strip()
    return {"Authorization": f"Bearer {token}"}


def makefile_runs(target: str) -> str:
    """What `make TARGET` runs, as `make -n` prints it."""
    return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True).stdout
