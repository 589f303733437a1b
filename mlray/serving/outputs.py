"""What a prediction looks like in each protocol, by task: the one place that decides it.

Classification answers class probabilities (N, K) and labels. Regression answers numbers: V1 ``predictions``
as numbers (one per row with one target, else a list per row), V2 one ``predictions`` output of datatype FP32
and shape [N, T], ``/invocations`` what ``mlflow models serve`` answers for the same model's pyfunc (a
scikit-learn-like regressor: a number per row). :mod:`mlray.serving.protocols` writes these into each
protocol's answer; :mod:`mlray.serving.openapi` documents them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlray.artifact import pyfunc_output
from mlray.serving.foreign import PyfuncModel
from mlray.serving.loader import Loaded

REGRESSION_OUTPUT = "predictions"


def v1_fields(outputs: np.ndarray, loaded: Loaded) -> dict[str, Any]:
    """The V1 answer's ``predictions`` (and ``labels`` for a classifier)."""
    if loaded.task == "regression":
        return {"predictions": _predict_values(np.asarray(outputs, dtype=np.float32), loaded).tolist()}
    if isinstance(loaded, PyfuncModel):  # labels in the classes' own type, as the model's predict answers them
        return {"predictions": outputs.tolist(), "labels": loaded.labels(outputs).tolist()}
    classes = loaded.class_names
    return {"predictions": outputs.tolist(), "labels": [classes[i] for i in outputs.argmax(axis=1)]}


def v2_tensors(outputs: np.ndarray, loaded: Loaded) -> dict[str, tuple[str, list[int], np.ndarray | list[str]]]:
    """Every V2 output by name, in order: (datatype, shape, data)."""
    values = np.asarray(outputs, dtype=np.float32)
    n, k = values.shape
    if loaded.task == "regression":
        return {REGRESSION_OUTPUT: ("FP32", [n, k], values)}
    labels = [loaded.class_names[c] for c in values.argmax(axis=1).tolist()]
    return {"probabilities": ("FP32", [n, k], values), "label": ("BYTES", [n], labels)}


def v2_output_metadata(loaded: Loaded) -> list[dict[str, Any]]:
    """The ``outputs`` of ``GET /v2/models/{name}`` (variable sizes are -1, as the spec says)."""
    if loaded.task == "regression":
        return [{"name": REGRESSION_OUTPUT, "datatype": "FP32", "shape": [-1, loaded.num_outputs]}]
    return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(loaded.class_names)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]}]


def invocations(outputs: np.ndarray, loaded: Loaded) -> np.ndarray:
    """What the model's pyfunc ``predict()`` returns for these rows, which ``/invocations`` writes out (for a
    classifier logged by another tool: its labels, as its ``predict`` answers)."""
    if isinstance(loaded, PyfuncModel) and loaded.task == "classification":
        return loaded.labels(outputs)
    return _predict_values(outputs, loaded)


def _predict_values(outputs: np.ndarray, loaded: Loaded) -> np.ndarray:
    """(N, T) numbers as a pyfunc's predict answers them: (N,) when T is 1."""
    if isinstance(loaded, PyfuncModel):
        return outputs[:, 0] if outputs.shape[1] == 1 else outputs
    return pyfunc_output(loaded, outputs)


def agree(champion: np.ndarray, challenger: np.ndarray, loaded: Loaded) -> bool:
    """Whether a shadow answer agrees with the champion's: the same labels, or values within 1e-3 (relative)."""
    if loaded.task == "regression":
        return bool(np.allclose(champion, challenger, rtol=1e-3, atol=1e-6))
    return bool((champion.argmax(1) == challenger.argmax(1)).all())
