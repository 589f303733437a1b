"""Token auth for the local head (mlray/_ray/auth.py, settings.ray_auth_env): the token mlray creates, the
environment every Ray process and client gets, and the venv hook that lets plain-shell `ray` / `serve` find
the token. No Ray: the hook runs in real Python processes through Python's own `site` machinery.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mlray import cluster, settings
from mlray._ray import auth
from mlray.errors import MlrayError

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLRAY_RAY_AUTH_MODE")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No auth variables set (the conftest sets RAY_AUTH_MODE=disabled for the suite), a private home; every
    variable mlray may set is put back afterwards."""
    for key in (*AUTH_VARS, *settings.ray_process_env()):
        monkeypatch.setenv(key, "")  # recorded, so the end of the test restores (or removes) it
        monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("MLRAY_HOME", str(home))
    return home


# -- the token ---------------------------------------------------------------------------------------------


def test_the_token_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "ray_token"
    auth.ensure_token(path)
    token = path.read_text()
    assert auth.TOKEN_PATTERN.fullmatch(token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    auth.ensure_token(path)
    assert path.read_text() == token  # never overwritten


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_token_others_may_read_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "ray_token"
    path.write_text("a" * 64)
    path.chmod(mode)
    with pytest.raises(MlrayError, match=rf"{path} has mode {stat.filemode(stat.S_IFREG | mode)}.*chmod 600 {path}"):
        auth.ensure_token(path)
    assert path.read_text() == "a" * 64  # left as it was


def test_a_file_that_is_not_a_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ray_token"
    path.write_text("password\n")
    path.chmod(0o600)
    with pytest.raises(MlrayError, match="does not hold a Ray auth token"):
        auth.ensure_token(path)


def test_the_bearer_header_follows_rays_lookup_order(tmp_path: Path) -> None:
    token_file = tmp_path / "t"
    token_file.write_text("b" * 64 + "\n")
    assert auth.bearer({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}) == {}
    assert auth.bearer({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}) == {
        "Authorization": f"Bearer {'b' * 64}"}
    assert auth.bearer({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "c" * 64, "RAY_AUTH_TOKEN_PATH": str(token_file)}
                       ) == {"Authorization": f"Bearer {'c' * 64}"}
    assert auth.bearer({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}) == {}


# -- the environment of Ray processes ----------------------------------------------------------------------


def test_by_default_ray_runs_with_token_auth_and_mlrays_token(clean_env: Path) -> None:
    env = settings.ray_process_env()
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(clean_env / "secrets" / "ray_token")
    assert "RAY_AUTH_TOKEN" not in env


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "disabled"}),  # the tests' shared cluster
        ({"MLRAY_RAY_AUTH_MODE": "token", "RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token"}),  # cluster nodes
        ({"RAY_AUTH_TOKEN_PATH": "/elsewhere/token"}, {"RAY_AUTH_MODE": "token"}),  # the caller's own token file
        ({"RAY_AUTH_TOKEN": "d" * 64}, {"RAY_AUTH_MODE": "token"}),
    ],
)
def test_a_callers_own_auth_choice_wins(clean_env: Path, monkeypatch: pytest.MonkeyPatch, given: dict[str, str],
                                        expected: dict[str, str]) -> None:
    for key, value in given.items():
        monkeypatch.setenv(key, value)
    assert settings.ray_auth_env() == expected
    cluster.ray_env()
    assert not (clean_env / "secrets").exists()  # mlray's token is created only when it is the one used


def test_apply_env_creates_the_token_and_sets_the_process_env(clean_env: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    refreshed: list[str | None] = []  # not Ray's own config here: this test process is shared with others
    monkeypatch.setattr(auth, "refresh_ray_config", lambda: refreshed.append(os.environ.get("RAY_AUTH_MODE")))
    cluster.apply_env()
    token = clean_env / "secrets" / "ray_token"
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert auth.TOKEN_PATTERN.fullmatch(token.read_text())
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert refreshed == ["token"]  # a process that imported Ray already re-reads its config
    cluster.apply_env()
    assert refreshed == ["token"]  # nothing changed, nothing to re-read


# -- the venv hook -----------------------------------------------------------------------------------------


def run_with_hook(site_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A fresh Python that processes ``site_dir``'s .pth files the way a venv's site-packages are processed."""
    code = ("import site, sys, os; site.addsitedir(sys.argv[1]); "
            "print(os.environ.get('RAY_AUTH_MODE'), os.environ.get('RAY_AUTH_TOKEN_PATH'))")
    base = {"PATH": "/usr/bin:/bin", "HOME": env.get("HOME", "/nonexistent")}
    return subprocess.run([sys.executable, "-S", "-c", code, str(site_dir)], capture_output=True, text=True,
                          env={**base, **env}, timeout=60)


@pytest.fixture
def head_record(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A hook written for a head's record that names a real token: (site dir, record, token)."""
    home = tmp_path / "state"
    token = auth.ensure_token(home / "secrets" / "ray_token")
    record = home / "cluster.json"
    record.write_text(json.dumps({"address": "10.0.0.1:6379", "auth_mode": "token", "token_path": str(token)}))
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / auth.HOOK_FILE).write_text(auth.hook_line(record))
    return site_dir, record, token


def test_the_hook_gives_a_plain_process_the_running_heads_token(head_record: tuple[Path, Path, Path]) -> None:
    site_dir, _, token = head_record
    done = run_with_hook(site_dir, {})
    assert (done.returncode, done.stdout.split(), done.stderr) == (0, ["token", str(token)], "")


@pytest.mark.parametrize("own", [{"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token"},
                                 {"RAY_AUTH_TOKEN": "e" * 64}, {"RAY_AUTH_TOKEN_PATH": "/mine"}])
def test_the_hook_leaves_a_process_that_chose_its_auth_alone(head_record: tuple[Path, Path, Path],
                                                             own: dict[str, str]) -> None:
    done = run_with_hook(head_record[0], own)
    expected = [own.get("RAY_AUTH_MODE", "None"), own.get("RAY_AUTH_TOKEN_PATH", "None")]
    assert (done.returncode, done.stdout.split(), done.stderr) == (0, expected, "")


@pytest.mark.parametrize("damage", ["no record", "broken record", "no token_path", "token gone", "record is a dir"])
def test_a_missing_or_broken_record_never_breaks_python_startup(head_record: tuple[Path, Path, Path],
                                                                damage: str) -> None:
    site_dir, record, token = head_record
    if damage == "no record":
        record.unlink()  # what `mlray down` leaves
    elif damage == "broken record":
        record.write_text("{not json")
    elif damage == "no token_path":
        record.write_text(json.dumps({"address": "10.0.0.1:6379", "auth_mode": "disabled"}))
    elif damage == "token gone":
        token.unlink()
    else:
        record.unlink()
        record.mkdir()
    done = run_with_hook(site_dir, {})
    assert (done.returncode, done.stdout.split(), done.stderr) == (0, ["None", "None"], "")


def test_the_hook_follows_mlray_home(head_record: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A process with its own $MLRAY_HOME gets that home's head, or nothing when it has none."""
    site_dir = head_record[0]
    other = tmp_path / "other"
    other.mkdir()
    assert run_with_hook(site_dir, {"MLRAY_HOME": str(other)}).stdout.split() == ["None", "None"]
    token = auth.ensure_token(other / "secrets" / "ray_token")
    (other / "cluster.json").write_text(json.dumps({"address": "x:1", "token_path": str(token)}))
    assert run_with_hook(site_dir, {"MLRAY_HOME": str(other)}).stdout.split() == ["token", str(token)]


def test_install_and_remove_the_hook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    monkeypatch.setattr(auth, "hook_folder", lambda: site_dir)
    ours, theirs = tmp_path / "a" / "cluster.json", tmp_path / "b" / "cluster.json"
    assert auth.install_hook(ours) == site_dir / auth.HOOK_FILE
    assert auth.remove_hook(theirs) is False  # another head's `down` leaves this head's hook
    assert (site_dir / auth.HOOK_FILE).read_text() == auth.hook_line(ours)
    assert auth.remove_hook(ours) is True
    assert list(site_dir.iterdir()) == []


def test_no_hook_outside_a_virtual_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)
    assert auth.hook_folder() is None
    assert auth.install_hook(tmp_path / "cluster.json") is None


@pytest.mark.parametrize("token_path", ["/p/.mlray/secrets/ray_token", None])
def test_the_quickstart_says_where_the_token_is(token_path: str | None) -> None:
    from types import SimpleNamespace

    from mlray.cli.console import quickstart_report

    result = SimpleNamespace(
        train=SimpleNamespace(model_name="digits", test_accuracy=0.97, run_id="r1", version=1),
        samples=[{"true": 3, "predicted": 3, "confidence": 0.9, "pixels": [0.0] * 64}], tracking_uri="sqlite:///x",
        seconds=90.0, dashboard_url="http://127.0.0.1:8265", url="http://127.0.0.1:8000", ray_token_path=token_path)
    lines = quickstart_report(result).splitlines()
    auth_lines = [line for line in lines if line.startswith("Ray auth:")]
    if token_path is None:
        assert auth_lines == []
    else:
        assert auth_lines == [f"Ray auth:        token in {token_path} (mode 0600); this venv's `ray` and"]
    assert lines[-1] == "Stop everything: mlray down"
