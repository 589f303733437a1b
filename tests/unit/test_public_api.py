"""`import mlray`: the public names, lazily imported, keyword-only options."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import mlray


def test_importing_mlray_starts_nothing_and_imports_no_torch_or_ray():
    code = ("import json, sys, mlray; names = list(mlray.__all__); "
            "print(json.dumps([name for name in ('torch', 'ray', 'mlflow') if name in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == []


def test_every_public_name_resolves():
    for name in mlray.__all__:
        assert getattr(mlray, name) is not None, name
    assert mlray.deploy is mlray.serve
    assert mlray.JobConfig.__module__ == "mlray.config"


def test_functions_take_options_by_keyword():
    for name in ("train", "tune", "promote", "serve", "predict", "load_model", "compress"):
        params = list(inspect.signature(getattr(mlray, name)).parameters.values())
        positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert len(positional) <= 2, (name, positional)  # the subject (config, name, rows); the rest keyword-only


def test_train_accepts_a_dict_and_checks_it_before_anything_runs():
    import pytest

    with pytest.raises(mlray.MlrayError, match="model.arch 'resnet' is not known"):
        mlray.train({"model": {"arch": "resnet"}})


def test_py_typed_ships():
    from pathlib import Path

    assert (Path(mlray.__file__).parent / "py.typed").is_file()
