"""Serving a registered model that another tool logged: anything ``mlflow.pyfunc.load_model`` loads.

mlray's own models keep their path (:func:`mlray.artifact.load_model_dir`: safetensors, sha256, no pandas).
Any other model comes through here, with two checks before any of its code runs:

- **integrity**: the sha256 of the downloaded files (:func:`mlray.artifact.tree_sha256`) is recorded in the
  version's tag ``mlray.files_sha256`` at its first load and compared on every later one: files changed in
  the artifact store after that are refused;
- **pickle**: a flavour stored as a pickle (scikit-learn's ``pickle``/``cloudpickle`` format, a
  ``python_function`` with a cloudpickled ``PythonModel``, a pickled PyTorch module) runs arbitrary code when
  it is loaded. It is refused unless the app's args say ``allow_pickle: true``: a decision to trust everyone
  who can write to the registry and its artifact store.

A :class:`PyfuncModel` has the surface serving uses of :class:`mlray.artifact.LoadedModel` (``predict``
returns (N, K) class probabilities for a classifier with ``predict_proba``, else the model's ``predict``
output as (N, T) numbers), so every protocol, the batcher and the rollout treat both alike.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlray.artifact import keep_by_hash
from mlray.errors import ModelLoadError
from mlray.serving.signature import InputSpec, input_spec

logger = logging.getLogger(__name__)

FILES_TAG = "mlray.files_sha256"
NUM_FEATURES_TAG = "mlray.num_features"
_PICKLE_FORMATS = ("pickle", "cloudpickle")


def _torch_pickle(conf: dict[str, Any], folder: Path | None) -> str | None:
    """MLflow's pytorch flavour writes the same MLmodel for a pickled module (``model.pth``) and for a
    ``torch.export`` program (``model.pt2``, which MLflow checks is pickle-free when it loads it): the files
    tell them apart. Without the files, without a .pt2, or with a .pth/.pt/.pkl beside it, it counts as a pickle."""
    if conf.get("serialization_format") == "pt2":
        return None
    data = folder / str(conf.get("model_data", "data")) if folder is not None else None
    files = {path.name for path in data.iterdir()} if data is not None and data.is_dir() else set()
    pickles = sorted(name for name in files if name.endswith((".pth", ".pt", ".pkl")))
    if "model.pt2" in files and not pickles:
        return None
    named = ", ".join(pickles) or "its model file"
    return f"its pytorch flavour is a pickled module ({named}; serialization_format pickle)"


def pickle_reason(flavors: dict[str, dict[str, Any]], folder: Path | None = None) -> str | None:
    """Why loading a model with these MLmodel flavours (stored in ``folder``) unpickles something, or None if
    it does not."""
    for flavour, conf in flavors.items():
        fmt = conf.get("serialization_format")
        if fmt in _PICKLE_FORMATS:
            return f"its {flavour} flavour is stored with {fmt} ({conf.get('pickled_model', 'the model file')})"
        if flavour == "python_function" and conf.get("python_model"):
            return f"its python_function flavour is a cloudpickled PythonModel ({conf['python_model']})"
        if flavour == "pytorch" and (reason := _torch_pickle(conf, folder)) is not None:
            return reason
    return None


def check_files(actual: str, recorded: str | None, *, where: str) -> bool:
    """True when ``actual`` must be recorded (first load); raises when it differs from the recorded hash."""
    if recorded is None:
        return True
    if actual != recorded:
        raise ModelLoadError(f"{where}: the model files' sha256 {actual[:16]}... does not match the "
                             f"{recorded[:16]}... recorded in tag {FILES_TAG} at its first load; the files "
                             "changed in the artifact store since. Refused; register the intended files as a "
                             "new version")
    return False


@dataclass(frozen=True)
class PyfuncModel:
    """A model loaded through MLflow, answering as :class:`mlray.artifact.LoadedModel` does."""

    spec: InputSpec
    predict_fn: Any  # (model input) -> predictions: the pyfunc's or the estimator's predict
    proba_fn: Any | None  # an estimator's predict_proba, for a classifier
    class_values: list[Any]
    num_outputs: int
    meta: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    @property
    def feature_names(self) -> list[str]:
        return self.spec.feature_names

    @property
    def num_features(self) -> int:
        return len(self.spec.feature_names)

    @property
    def class_names(self) -> list[str]:
        return [str(value) for value in self.class_values]

    @property
    def variant(self) -> str:
        """A compressed variant is always one of mlray's own models; a model from another tool is as logged."""
        return "none"

    @property
    def task(self) -> str:
        # "regression" is what the protocols call an answer of plain numbers (see mlray.serving.outputs)
        return "classification" if self.proba_fn is not None else "regression"

    def check_input(self, x: np.ndarray) -> None:
        """The signature's own type checks (whole numbers, booleans), before the request is batched."""
        self.spec.check(x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, F) float32 -> (N, K) float64 probabilities for a classifier, else (N, T) predictions."""
        data = self.spec.model_input(x)
        if self.proba_fn is not None:
            return np.asarray(self.proba_fn(data), dtype=np.float64)
        return as_matrix(self.predict_fn(data), rows=len(x))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.predict(x)

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        """A classifier's labels, in the classes' own type (what its ``predict`` answers)."""
        return np.asarray(self.class_values, dtype=object)[probabilities.argmax(axis=1)]


def as_matrix(predictions: Any, *, rows: int) -> np.ndarray:
    """A model's predictions (array, list, Series, DataFrame) -> (N, T) float64, or a clear error."""
    values = predictions.to_numpy() if hasattr(predictions, "to_numpy") else predictions
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"the model's predict returned {type(predictions).__name__} values that are not "
                             f"numbers ({err}); mlray serves numeric predictions, or a classifier's "
                             "predict_proba") from None
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] != rows:
        raise ModelLoadError(f"the model's predict returned shape {list(array.shape)} for {rows} rows; expected "
                             f"({rows},) or ({rows}, T)")
    return array


def keep_files(root: Path, sha256: str) -> Path:
    """Move the downloaded files to a folder named by their hash: a pyfunc may read its files after loading."""
    return keep_by_hash(root, "mlray-models", sha256)


def load_pyfunc_dir(folder: Path, *, allow_pickle: bool, num_features: int | None = None) -> PyfuncModel:
    """Load a downloaded MLflow model folder (its files already checked) as a :class:`PyfuncModel`."""
    import mlflow.pyfunc
    from mlflow.models import Model

    try:
        mlmodel = Model.load(str(folder / "MLmodel"))
    except Exception as err:  # noqa: BLE001 - not an MLflow model folder at all
        raise ModelLoadError(f"{folder} is not an MLflow model: {err}") from None
    reason = pickle_reason(mlmodel.flavors, folder)
    if reason is not None and not allow_pickle:
        raise ModelLoadError(f"refused to load a pickle: {reason}, and unpickling runs whatever code the file "
                             "holds. Set allow_pickle: true in the Serve app's args only if you trust everyone "
                             "who can write to this registry and its artifact store")
    if reason is not None:
        logger.warning("Loading a pickle (%s) because the app sets allow_pickle: true", reason)
    estimator = None
    try:
        if "sklearn" in mlmodel.flavors:
            import mlflow.sklearn

            estimator = mlflow.sklearn.load_model(str(folder))
            predict_fn = estimator.predict
        else:
            predict_fn = mlflow.pyfunc.load_model(str(folder)).predict
    except Exception as err:  # noqa: BLE001 - any failure here means this version cannot serve
        raise ModelLoadError(f"mlflow cannot load {folder}: {type(err).__name__}: {err}") from None
    names = getattr(estimator, "feature_names_in_", None)
    spec = input_spec(mlmodel.signature, num_features=getattr(estimator, "n_features_in_", None) or num_features,
                      feature_names=None if names is None else [str(n) for n in names])
    proba_fn = getattr(estimator, "predict_proba", None) if hasattr(estimator, "classes_") else None
    classes = list(np.asarray(getattr(estimator, "classes_", [])).tolist()) if proba_fn is not None else []
    model = PyfuncModel(spec=spec, predict_fn=predict_fn, proba_fn=proba_fn,
                        class_values=classes, num_outputs=len(classes) or 1,
                        meta={"flavors": sorted(mlmodel.flavors), "pickle": reason, "input": spec.describe()})
    if proba_fn is None:  # the width of predict's answer, from one row
        width = model.predict(np.zeros((1, model.num_features), dtype=np.float32)).shape[1]
        model = dataclasses.replace(model, num_outputs=width)
    return model
