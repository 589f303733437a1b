"""MLflow "models from code" entry: the pyfunc model is defined here, not pickled into the artifact."""

import mlflow.models

from mlray.artifact import MlrayPyfunc

mlflow.models.set_model(MlrayPyfunc())
