"""Model factories by import path: resolution, the checks before any worker starts, and the source that
travels with a model into processes that never imported it. No Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlray.artifact import CODE_DIR, load_model_dir, write_model_dir
from mlray.config import parse_config
from mlray.errors import ConfigError, ModelLoadError
from mlray.models import ModelSpec, build, check_model, factory_code, register, resolve_factory

USERPROJECT = Path(__file__).resolve().parents[1] / "fixtures" / "userproject"


@pytest.fixture
def userproject(monkeypatch: pytest.MonkeyPatch):
    """The fixture project on sys.path, as it is in a job's working_dir; forgotten again afterwards."""
    monkeypatch.syspath_prepend(str(USERPROJECT))
    yield USERPROJECT
    for name in [n for n in sys.modules if n == "usermodel" or n.startswith("usermodel.")]:
        del sys.modules[name]


def _spec(factory: str, *, f: int = 5, k: int = 3, task: str = "classification", **kwargs) -> ModelSpec:
    return ModelSpec(factory=factory, num_features=f, num_outputs=k, kwargs=kwargs, task=task)


def test_builtin_arch_is_a_shorthand_for_a_factory():
    cfg = parse_config({"model": {"arch": "cnn", "hidden": [8, 16]}})
    assert cfg.model.factory_path == "mlray.models:cnn"
    assert cfg.model.factory_kwargs == {"hidden": [8, 16], "dropout": 0.1}
    user = parse_config({"model": {"factory": "usermodel.nets:residual_mlp", "kwargs": {"width": 8}}})
    assert user.model.factory_path == "usermodel.nets:residual_mlp" and user.model.factory_kwargs == {"width": 8}


@pytest.mark.parametrize(("model", "message"), [
    ({"factory": "usermodel.nets"}, "model.factory: String should match pattern"),
    ({"factory": "a.b:c", "hidden": [4]}, "model.hidden applies to the built-in architectures"),
    ({"kwargs": {"width": 4}}, "model.kwargs needs model.factory"),
    ({"arch": "transformer"}, "model.arch 'transformer' is not known"),
])
def test_model_section_errors_name_the_field(model, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"model": model})


def test_a_user_factory_builds_behind_standardize(userproject):
    model = check_model(_spec("usermodel.nets:residual_mlp", width=8, depth=3))
    assert type(model.body).__name__ == "ResidualMLP" and len(model.body.blocks) == 3
    assert model(torch.zeros(4, 5)).shape == (4, 3)


def test_factory_that_does_not_import():
    with pytest.raises(ConfigError, match=r"model.factory 'nosuchpkg.nets:mlp': module 'nosuchpkg.nets' does not "
                                          r"import \(ModuleNotFoundError"):
        check_model(_spec("nosuchpkg.nets:mlp"))


def test_factory_module_without_the_function(userproject):
    with pytest.raises(ConfigError, match="model.factory 'usermodel.nets:nope': 'usermodel.nets' has no callable"):
        check_model(_spec("usermodel.nets:nope"))


def test_factory_with_the_wrong_signature(userproject):
    with pytest.raises(ConfigError, match=r"model.factory 'usermodel.nets:wrong_signature' cannot be called as "
                                          r"wrong_signature\(num_features=..., num_outputs=..., \*\*model.kwargs\)"):
        check_model(_spec("usermodel.nets:wrong_signature"))
    with pytest.raises(ConfigError, match=r"with model.kwargs \{'colour': 'red'\}: got an unexpected keyword"):
        check_model(_spec("usermodel.nets:residual_mlp", colour="red"))


def test_factory_whose_output_does_not_fit_the_task(userproject):
    with pytest.raises(ConfigError, match=r"maps a \(2, 5\) batch to \(2, 4\); classification needs \(N, 3\) class "
                                          r"logits"):
        check_model(_spec("usermodel.nets:wrong_shape"))
    with pytest.raises(ConfigError, match=r"to \(2, 2\); regression needs \(N, 1\) target values"):
        check_model(_spec("usermodel.nets:wrong_shape", k=1, task="regression"))


def test_factory_returning_something_else():
    with pytest.raises(ConfigError, match="returned dict, not a torch nn.Module"):
        check_model(_spec("builtins:dict"))


def test_register_is_gone_with_a_pointer_to_what_replaced_it():
    with pytest.raises(ConfigError, match="model.factory: 'package.module:function'"):
        register("mine")


def test_factory_code_is_the_user_package_only(userproject):
    assert factory_code("mlray.models:mlp") is None
    code = factory_code("usermodel.nets:residual_mlp")
    assert code is not None and code.top == USERPROJECT / "usermodel" and code.root == USERPROJECT


def test_current_directory_is_searched_for_a_top_level_factory_module(tmp_path, monkeypatch):
    (tmp_path / "cwd_only_model.py").write_text(
        "from torch import nn\n\n\ndef make(*, num_features, num_outputs):\n"
        "    return nn.Linear(num_features, num_outputs)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert callable(resolve_factory("cwd_only_model:make"))
    finally:
        sys.modules.pop("cwd_only_model", None)


FRESH_LOAD = """
import json, sys
import numpy as np
from mlray.artifact import load_model_dir
loaded = load_model_dir(sys.argv[1])
x = np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
print(json.dumps({"out": loaded.predict(x).tolist(), "had_usermodel": "usermodel" in sys.modules,
                  "body": type(loaded.model.body).__name__}))
"""


def _written(tmp_path: Path, task: str = "classification") -> tuple[Path, object, np.ndarray]:
    spec = _spec("usermodel.nets:residual_mlp", k=3 if task == "classification" else 1, task=task, width=8)
    torch.manual_seed(0)
    model = build(spec)
    model.standardize.fit([1.0] * 5, [2.0] * 5)
    if model.target is not None:
        model.target.fit([100.0], [10.0])
    folder = tmp_path / "model"
    meta = write_model_dir(folder, model=model, feature_names=list("abcde"),
                           class_names=["x", "y", "z"] if task == "classification" else [])
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    return folder, meta, x


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_fresh_process_that_never_imported_the_factory_loads_the_model(tmp_path, userproject, task):
    folder, meta, x = _written(tmp_path, task)
    assert (folder / CODE_DIR / "usermodel" / "nets.py").is_file() and meta["code_sha256"]
    assert json.loads((folder / "mlray_model.json").read_text())["spec"]["factory"] == "usermodel.nets:residual_mlp"
    expected = load_model_dir(folder).predict(x)
    # The child's sys.path does not have the user project: only the model folder's code/ can provide it.
    done = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(folder), json.dumps(x.tolist())],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["body"] == "ResidualMLP" and child["had_usermodel"]
    np.testing.assert_allclose(np.asarray(child["out"]), expected, atol=1e-6)
    if task == "regression":
        assert expected.shape == (4, 1) and abs(float(expected.mean()) - 100.0) < 60  # in the target's units


def test_changed_code_is_refused(tmp_path, userproject):
    folder, _, _ = _written(tmp_path)
    nets = folder / CODE_DIR / "usermodel" / "nets.py"
    nets.write_text(nets.read_text() + "\nimport os  # changed after registration\n")
    with pytest.raises(ModelLoadError, match="code sha256 .* does not match the metadata"):
        load_model_dir(folder)


def test_a_factory_that_raises_is_reported_with_its_arguments(userproject):
    with pytest.raises(ConfigError, match=r"model.factory 'usermodel.nets:residual_mlp' failed with num_features=5, "
                                          r"num_outputs=3, model.kwargs \{'width': -1\}: RuntimeError"):
        check_model(_spec("usermodel.nets:residual_mlp", width=-1))
