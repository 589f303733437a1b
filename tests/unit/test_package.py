"""`pip install .` as a user would, then `mlray --version`, without downloading anything.

A wheel is built from this checkout (pyproject.toml, setuptools, no build isolation) and installed with
``--no-deps`` into a fresh Python 3.11 venv. The venv reaches the project's dependencies through a ``.pth``
line naming the test venv's site-packages: a plain path line, so that folder's own ``.pth`` files (the
editable install's finder among them) are not run, and the only ``mlray`` the fresh venv can import is the
wheel's. What this proves: the package builds from its metadata, the wheel holds every module and data
file the commands import, its console script runs, and it imports against the installed dependency
versions. What it does not: that pip resolves those dependencies from an index (the machine is offline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


def test_the_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    # A copy of the checkout: setuptools writes build/ and mlray.egg-info/ next to the sources, and an
    # egg-info on the path would read as "mlray already installed" to pip.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", ".mlray", "__pycache__", "build",
                                                                "*.egg-info", "dist", ".*_cache"))
    clean = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
          "-w", str(tmp_path / "dist"), str(source)], cwd=tmp_path, env=clean)
    (wheel,) = (tmp_path / "dist").glob("mlray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {"mlray/py.typed", "mlray/_ray/haproxy.py", "mlray/serving/digits.yaml", "serve_apps/digits.yaml"}
    assert shipped <= set(names)
    # serve_apps/digits.yaml (for `serve deploy`) is a link to the library's default: the same bytes in the wheel
    built = zipfile.ZipFile(wheel)
    assert built.read("serve_apps/digits.yaml") == built.read("mlray/serving/digits.yaml")
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Python: >=3.11" in meta and "License-Expression: Apache-2.0" in meta

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
          str(wheel)], env=clean, cwd=tmp_path)
    # After the install: with it first, pip would find the test venv's (editable) mlray and install nothing.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"  # not the checkout: its mlray/ must not be on the path
    outside.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLRAY_HOME": str(tmp_path / "home")}
    version = _run([str(venv / "bin" / "mlray"), "--version"], cwd=outside, env=env)
    assert version.stdout.strip() == "mlray 0.1.0"
    where = _run([str(python), "-c", "import mlray, json; print(json.dumps(mlray.__file__))"], cwd=outside, env=env)
    assert Path(json.loads(where.stdout)).is_relative_to(venv), where.stdout
    schema = _run([str(venv / "bin" / "mlray"), "schema", "serve"], cwd=outside, env=env)
    assert "ServeAppConfig" in schema.stdout or "alias" in json.loads(schema.stdout)["properties"]
