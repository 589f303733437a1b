"""MLflow "models from code" entry: the pyfunc model is defined here and logged as source, not pickled.

MLflow executes this file when it loads the model (``mlflow.pyfunc.load_model``, ``mlflow models
serve``); mlray's own serving path does not use it and reads the weights with :mod:`mlray.artifact`.
A user factory's source comes with the model and is put on sys.path by :func:`mlray.artifact.load_model_dir`.
"""

from pathlib import Path

import mlflow.models
from mlflow.pyfunc import PythonModel  # not mlflow.pyfunc.PythonModel: mlflow.pyfunc is a LazyLoader to mypy

from mlray.artifact import ARTIFACT_KEY, load_model_dir, pyfunc_output


class MlrayPyfunc(PythonModel):
    """predict() returns class probabilities (N, K), or regression values (:func:`mlray.artifact.pyfunc_output`)."""

    def load_context(self, context):  # type: ignore[no-untyped-def]
        self._loaded = load_model_dir(Path(context.artifacts[ARTIFACT_KEY]))

    # No type hints on purpose: MLflow 3 would read them as a second, conflicting signature.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input
        return pyfunc_output(self._loaded, self._loaded.predict(x))


mlflow.models.set_model(MlrayPyfunc())
