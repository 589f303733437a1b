"""Models logged by other tools: signature checks, the pickle refusal and the files' hash, on a real MLflow
store (SQLite + local artifacts), no Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlray.errors import InvalidInput, ModelLoadError
from mlray.serving.foreign import FILES_TAG, check_files, pickle_reason
from mlray.serving.signature import InputSpec, input_spec
from tests.foreign_models import iris, register_classifier, register_regressor, register_torch


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLRAY_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLRAY_ARTIFACT_ROOT", raising=False)  # set by a Ray head an earlier test started here
    return tmp_path


def test_sklearn_classifier_answers_probabilities_and_the_pyfunc_labels(store):
    import mlflow.pyfunc

    from mlray.registry import get_version
    from mlray.serving.foreign import PyfuncModel
    from mlray.serving.loader import load_registered
    from mlray.serving.outputs import invocations, v1_fields

    version = register_classifier("iris")
    served = load_registered("iris", version=version)
    loaded = served.loaded
    assert isinstance(loaded, PyfuncModel) and loaded.task == "classification"
    assert loaded.meta["pickle"] is None  # skops, mlflow's default for scikit-learn
    assert loaded.feature_names[0] == "sepal length (cm)" and loaded.class_values == [0, 1, 2]
    x, _ = iris()
    rows = x.to_numpy(dtype=np.float32)
    probabilities = loaded.predict(rows)
    offline = mlflow.pyfunc.load_model(f"models:/iris/{version}").predict(x)
    assert v1_fields(probabilities, loaded)["labels"] == offline.tolist()
    assert invocations(probabilities, loaded).tolist() == offline.tolist()
    recorded = get_version("iris", version=version).tags[FILES_TAG]  # by the first load
    assert load_registered("iris", version=version).info.tags[FILES_TAG] == recorded  # the same files again


def test_pickled_python_function_is_refused_unless_allowed(store):
    import mlflow.pyfunc

    from mlray.serving.loader import load_registered

    version = register_regressor("halfsum")
    with pytest.raises(ModelLoadError, match=r"refused to load a pickle: its python_function flavour is a "
                                             r"cloudpickled PythonModel .*allow_pickle: true"):
        load_registered("halfsum", version=version)
    loaded = load_registered("halfsum", version=version, allow_pickle=True).loaded
    x, _ = iris()
    offline = mlflow.pyfunc.load_model(f"models:/halfsum/{version}").predict(x.to_numpy())
    assert loaded.task == "regression" and loaded.num_outputs == 1
    np.testing.assert_allclose(loaded.predict(x.to_numpy(dtype=np.float32))[:, 0], offline, atol=1e-5)


def test_sklearn_pickle_format_is_refused(store):
    from mlray.serving.loader import load_registered

    version = register_classifier("iris-pickle", serialization_format="cloudpickle")
    with pytest.raises(ModelLoadError, match="its sklearn flavour is stored with cloudpickle"):
        load_registered("iris-pickle", version=version)


def test_files_changed_after_the_first_load_are_refused(store):
    from mlray.registry import get_version
    from mlray.serving.loader import load_registered

    version = register_classifier("iris")
    load_registered("iris", version=version)  # records the hash
    recorded = get_version("iris", version=version).tags[FILES_TAG]
    source = next(Path(store).rglob("model.skops"))
    source.write_bytes(source.read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match=rf"does not match the {recorded[:16]}\.\.\. recorded in tag {FILES_TAG}"):
        load_registered("iris", version=version)


def test_check_files_records_first_and_refuses_a_change():
    assert check_files("a" * 64, None, where="m version 1") is True
    assert check_files("a" * 64, "a" * 64, where="m version 1") is False
    with pytest.raises(ModelLoadError, match="m version 1: the model files' sha256 bbbb"):
        check_files("b" * 64, "a" * 64, where="m version 1")


def test_torch_modules_load_as_exported_programs_and_pickled_ones_only_when_allowed(store):
    import mlflow.pyfunc

    from mlray.serving.loader import load_registered

    exported, pickled = register_torch("exported"), register_torch("pickled", serialization_format="pickle")
    loaded = load_registered("exported", version=exported).loaded  # no allow_pickle needed
    x, _ = iris()
    rows = x.to_numpy(dtype=np.float32)
    offline = mlflow.pyfunc.load_model(f"models:/exported/{exported}").predict(rows)
    np.testing.assert_allclose(loaded.predict(rows), offline, atol=1e-6)
    with pytest.raises(ModelLoadError, match=r"refused to load a pickle: its pytorch flavour is a pickled module "
                                             r"\(model.pth"):
        load_registered("pickled", version=pickled)
    allowed = load_registered("pickled", version=pickled, allow_pickle=True).loaded
    assert allowed.predict(rows).shape == (len(rows), 3)


def test_pickle_reason_by_flavour(tmp_path):
    assert pickle_reason({"sklearn": {"serialization_format": "skops"}, "python_function": {}}) is None
    assert "pickle" in (pickle_reason({"sklearn": {"serialization_format": "pickle"}}) or "")
    assert "PythonModel" in (pickle_reason({"python_function": {"python_model": "python_model.pkl"}}) or "")
    assert pickle_reason({"pytorch": {"serialization_format": "pt2"}}) is None
    # MLflow writes the same MLmodel for both torch formats: the files decide, and without them it is a pickle
    torch_conf = {"pytorch": {"model_data": "data"},
                  "python_function": {"loader_module": "mlflow.pytorch",
                                      "pickle_module_name": "mlflow.pytorch.pickle_module"}}
    assert "pickled module (its model file" in (pickle_reason(torch_conf) or "")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "model.pt2").write_bytes(b"")
    assert pickle_reason(torch_conf, tmp_path) is None
    (tmp_path / "data" / "model.pth").write_bytes(b"")
    assert "pickled module (model.pth" in (pickle_reason(torch_conf, tmp_path) or "")


def _signature(inputs: str):  # noqa: ANN202 - an MLflow ModelSignature
    from mlflow.models.signature import ModelSignature
    from mlflow.types import Schema

    return ModelSignature(inputs=Schema.from_json(inputs))


def test_column_signature_types_name_the_column_and_row():
    spec = input_spec(_signature('[{"type": "double", "name": "a"}, {"type": "long", "name": "n"},'
                                 ' {"type": "boolean", "name": "flag"}]'), num_features=None)
    assert spec.feature_names == ["a", "n", "flag"]
    spec.check(np.array([[0.5, 3, 1]], dtype=np.float32))
    with pytest.raises(InvalidInput, match=r"column 'n' \(row 1\) is 2\.5; the model's signature types it long"):
        spec.check(np.array([[0.5, 3, 1], [0.5, 2.5, 0]], dtype=np.float32))
    with pytest.raises(InvalidInput, match=r"column 'flag' \(row 0\) is 2\.0; .* boolean: expected 0 or 1"):
        spec.check(np.array([[0.5, 3, 2]], dtype=np.float32))
    frame = spec.model_input(np.array([[0.5, 3, 1]], dtype=np.float32))
    assert [str(t) for t in frame.dtypes] == ["float64", "int64", "bool"]


def test_string_columns_and_odd_tensors_are_refused_at_load():
    with pytest.raises(ModelLoadError, match="input column 'city' is of type string; mlray serves numeric"):
        input_spec(_signature('[{"type": "double", "name": "a"}, {"type": "string", "name": "city"}]'),
                   num_features=None)
    with pytest.raises(ModelLoadError, match=r"of shape \[-1, 8, 8\]"):
        input_spec(_signature('[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 8, 8]}}]'),
                   num_features=None)


def test_no_signature_takes_a_numeric_matrix_and_says_so():
    spec = input_spec(None, num_features=3)
    assert spec == InputSpec(feature_names=["x0", "x1", "x2"]) and not spec.has_signature
    assert spec.describe()["signature"] is None and "numeric matrix of 3 columns" in spec.describe()["accepts"]
    with pytest.raises(ModelLoadError, match="no signature and its number of input columns is unknown"):
        input_spec(None, num_features=None)


def test_a_model_without_signature_takes_a_matrix_of_the_width_its_tag_gives(store):
    from mlray.registry import get_version
    from mlray.registry.tracking import client
    from mlray.serving.foreign import NUM_FEATURES_TAG
    from mlray.serving.loader import load_registered

    version = register_regressor("bare", signature=False)
    with pytest.raises(ModelLoadError, match="no signature and its number of input columns is unknown"):
        load_registered("bare", version=version, allow_pickle=True)
    client().set_model_version_tag("bare", str(version), NUM_FEATURES_TAG, "4")
    assert get_version("bare", version=version).tags[NUM_FEATURES_TAG] == "4"
    loaded = load_registered("bare", version=version, allow_pickle=True).loaded
    assert loaded.feature_names == ["x0", "x1", "x2", "x3"]
    assert loaded.meta["input"] == {"signature": None, "accepts": "a numeric matrix of 4 columns (the model was "
                                                                  "logged without a signature)"}
    np.testing.assert_allclose(loaded.predict(np.ones((2, 4), dtype=np.float32)), [[2.0], [2.0]])
