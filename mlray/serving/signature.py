"""What a model logged by another tool takes, read from its MLflow signature, and the checks that follow.

mlray's three protocols parse every request into one (N, F) float32 array (:mod:`mlray.serving.validation`);
a signature says how that array becomes the model's input: a DataFrame of named, typed columns (a column
signature) or one tensor of shape (-1, F) (a tensor signature). Only numeric inputs are served: a column of
strings, bytes or dates is refused when the model loads, with its name. Nothing here needs Ray or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlray.errors import InvalidInput, ModelLoadError

# MLflow's column types mlray serves -> the numpy dtype handed to the model; the (low, high) of whole types.
COLUMN_DTYPES = {"double": "float64", "float": "float32", "long": "int64", "integer": "int32", "boolean": "bool"}
_WHOLE = {"long": (-(2**63), 2**63 - 1), "integer": (-(2**31), 2**31 - 1), "boolean": (0, 1)}
_TENSOR_KINDS = "fiub"  # numpy kinds of a numeric tensor: float, signed, unsigned, bool


@dataclass(frozen=True)
class InputSpec:
    """The model's input: ``feature_names`` (F names, in order) and how the (N, F) array is handed over.

    ``column_types`` (MLflow type names, one per feature) for a column signature; ``tensor_dtype`` for a
    tensor signature; neither for a model logged without a signature (it takes a numeric matrix).
    """

    feature_names: list[str]
    column_types: list[str] | None = None
    tensor_dtype: str | None = None

    @property
    def has_signature(self) -> bool:
        return self.column_types is not None or self.tensor_dtype is not None

    def describe(self) -> dict[str, Any]:
        """What the metadata routes show about the input."""
        if self.column_types is not None:
            return {"signature": "columns",
                    "columns": [{"name": n, "type": t} for n, t in zip(self.feature_names, self.column_types,
                                                                       strict=True)]}
        if self.tensor_dtype is not None:
            return {"signature": "tensor", "dtype": self.tensor_dtype, "shape": [-1, len(self.feature_names)]}
        return {"signature": None, "accepts": f"a numeric matrix of {len(self.feature_names)} columns (the model "
                                              "was logged without a signature)"}

    def check(self, x: np.ndarray) -> None:
        """Refuse values a whole-number or boolean column cannot take, naming the column and the row.

        ``x`` is (N, F) float32, already finite (the protocols refuse the rest).
        """
        if self.column_types is None:
            return
        for j, kind in enumerate(self.column_types):
            if kind not in _WHOLE:
                continue
            low, high = _WHOLE[kind]
            column = x[:, j]
            bad = np.flatnonzero((column != np.round(column)) | (column < low) | (column > high))
            if bad.size:
                row = int(bad[0])
                expected = "0 or 1 (false or true)" if kind == "boolean" else f"a whole number in {low}..{high}"
                raise InvalidInput(f"column {self.feature_names[j]!r} (row {row}) is {float(column[row])!r}; the "
                                   f"model's signature types it {kind}: expected {expected}")

    def model_input(self, x: np.ndarray) -> Any:
        """(N, F) float32 -> what the model's predict takes: a typed DataFrame, a tensor, or a float64 matrix."""
        if self.column_types is not None:
            import pandas as pd

            return pd.DataFrame({name: x[:, j].astype(COLUMN_DTYPES[kind]) for j, (name, kind)
                                 in enumerate(zip(self.feature_names, self.column_types, strict=True))})
        return np.ascontiguousarray(x, dtype=self.tensor_dtype or "float64")


def input_spec(signature: Any, *, num_features: int | None, feature_names: list[str] | None = None) -> InputSpec:
    """The :class:`InputSpec` of an MLflow ``ModelSignature`` (or None: no signature).

    Without a signature the width comes from ``num_features`` (the flavour's ``n_features_in_``, or the
    version's ``mlray.num_features`` tag); without either the model cannot be served and says how to fix it.
    """
    if signature is None or signature.inputs is None:
        if not num_features:
            raise ModelLoadError("the model has no signature and its number of input columns is unknown; log it "
                                 "with a signature (an input_example is enough) or set the version tag "
                                 "mlray.num_features")
        return InputSpec(feature_names=list(feature_names or [f"x{j}" for j in range(num_features)]))
    specs = list(signature.inputs.inputs)
    if signature.inputs.is_tensor_spec():
        if len(specs) != 1:
            raise ModelLoadError(f"the signature has {len(specs)} input tensors; mlray serves models with one "
                                 "numeric tensor of shape (-1, F)")
        tensor = specs[0]
        dtype = np.dtype(tensor.type)
        shape = tuple(tensor.shape)
        if dtype.kind not in _TENSOR_KINDS or len(shape) != 2 or shape[1] is None or shape[1] < 1:
            raise ModelLoadError(f"the input tensor is {dtype} of shape {list(shape)}; mlray serves one numeric "
                                 "tensor of shape (-1, F) with F known")
        return InputSpec(feature_names=[f"x{j}" for j in range(shape[1])], tensor_dtype=dtype.name)
    names, kinds = [], []
    for j, column in enumerate(specs):
        kind = str(getattr(column.type, "name", column.type))
        name = column.name if column.name is not None else str(j)
        if kind not in COLUMN_DTYPES:
            raise ModelLoadError(f"input column {name!r} is of type {kind}; mlray serves numeric columns only "
                                 f"({', '.join(COLUMN_DTYPES)})")
        names.append(name)
        kinds.append(kind)
    return InputSpec(feature_names=names, column_types=kinds)
