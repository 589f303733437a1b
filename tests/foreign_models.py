"""Models logged by other tools than mlray (scikit-learn, a plain python_function), registered for serving."""

from __future__ import annotations

from typing import Any

import numpy as np


def iris() -> tuple[Any, np.ndarray]:
    """Iris as a DataFrame with its column names, and its labels (0, 1, 2)."""
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True, as_frame=True)
    return x, y.to_numpy()


def register_classifier(name: str, *, serialization_format: str = "skops") -> int:
    """A scikit-learn LogisticRegression on iris, logged with mlflow.sklearn (column signature), registered."""
    import mlflow
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression

    from mlray import settings
    from mlray.registry.tracking import experiment_id

    x, y = iris()
    model = LogisticRegression(max_iter=500).fit(x, y)
    mlflow.set_tracking_uri(settings.tracking_uri())
    mlflow.set_registry_uri(settings.tracking_uri())
    with mlflow.start_run(experiment_id=experiment_id(name)):  # artifacts under MLRAY_HOME, not ./mlruns
        info = mlflow.sklearn.log_model(model, name="model", input_example=x.iloc[:2], registered_model_name=name,
                                        serialization_format=serialization_format,
                                        pip_requirements=["scikit-learn"])
    return int(info.registered_model_version)


def register_regressor(name: str, *, signature: bool = True) -> int:
    """A plain python_function (a cloudpickled PythonModel): 0.5 * the row's sum, over 4 float64 columns."""
    import mlflow
    import mlflow.pyfunc

    from mlray import settings
    from mlray.registry.tracking import experiment_id

    class HalfSum(mlflow.pyfunc.PythonModel):  # defined here so that cloudpickle stores it by value
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return np.asarray(model_input, dtype=np.float64).sum(axis=1) * 0.5

    x, _ = iris()
    mlflow.set_tracking_uri(settings.tracking_uri())
    mlflow.set_registry_uri(settings.tracking_uri())
    with mlflow.start_run(experiment_id=experiment_id(name)):  # artifacts under MLRAY_HOME, not ./mlruns
        info = mlflow.pyfunc.log_model(name="model", python_model=HalfSum(),
                                       input_example=x.iloc[:2].to_numpy() if signature else None,
                                       registered_model_name=name, pip_requirements=["numpy"])
    return int(info.registered_model_version)


def register_torch(name: str, *, serialization_format: str = "pt2") -> int:
    """A PyTorch module logged with mlflow.pytorch (tensor signature): 4 float32 inputs -> 3 numbers. MLflow's
    default format, ``pt2``, is a torch.export program (no pickle); ``pickle`` is a pickled module."""
    import mlflow
    import mlflow.pytorch
    import torch

    from mlray import settings
    from mlray.registry.tracking import experiment_id

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    x, _ = iris()
    mlflow.set_tracking_uri(settings.tracking_uri())
    mlflow.set_registry_uri(settings.tracking_uri())
    with mlflow.start_run(experiment_id=experiment_id(name)):  # artifacts under MLRAY_HOME, not ./mlruns
        info = mlflow.pytorch.log_model(model, name="model", input_example=x.iloc[:2].to_numpy(dtype=np.float32),
                                        registered_model_name=name, pip_requirements=["torch"],
                                        serialization_format=serialization_format)
    return int(info.registered_model_version)
