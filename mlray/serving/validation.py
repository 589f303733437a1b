"""Prediction requests checked against the model's signature, before any tensor is made.

Every problem becomes an :class:`~mlray.errors.MlrayError` whose message names the field, the value and
what was expected; the HTTP layer turns it into a 4xx. Nothing here needs Ray or a model.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from mlray.errors import BadRequest, InvalidInput, PayloadTooLarge


def parse_json(body: bytes, *, max_bytes: int) -> Any:
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {max_bytes}")
    if not body.strip():
        raise BadRequest("request body is empty; expected a JSON object such as {\"instances\": [[...]]}")
    try:
        # NaN and Infinity are not JSON; Python's parser would accept them, so refuse them here.
        return json.loads(body, parse_constant=_refuse_constant)
    except InvalidInput:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"request body is not valid JSON: {err}") from None


def _refuse_constant(name: str) -> Any:
    raise InvalidInput(f"{name} is not a number this model accepts; send finite numbers only")


def _describe(value: Any) -> str:
    text = json.dumps(value)[:40] if not isinstance(value, float) else repr(value)
    return f"{text} ({type(value).__name__})"


def rows_to_array(rows: Any, *, field: str, num_features: int, max_rows: int) -> np.ndarray:
    """A list of rows of ``num_features`` finite numbers -> (N, F) float32 array."""
    if not isinstance(rows, list):
        raise InvalidInput(f"'{field}' must be a list of rows, got {_describe(rows)}")
    if not rows:
        raise InvalidInput(f"'{field}' is empty; send at least one row of {num_features} numbers")
    if len(rows) > max_rows:
        raise PayloadTooLarge(f"'{field}' has {len(rows)} rows; the limit is {max_rows} per request")
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise InvalidInput(f"'{field}[{i}]' must be a list of {num_features} numbers, got {_describe(row)}")
        if len(row) != num_features:
            raise InvalidInput(f"'{field}[{i}]' has {len(row)} features; the model expects {num_features}")
        for j, value in enumerate(row):
            # bool is an int subclass in Python; true/false are not features
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInput(f"'{field}[{i}][{j}]' must be a number, got {_describe(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidInput(f"'{field}[{i}][{j}]' is {value}; only finite numbers are accepted")
    with np.errstate(over="ignore"):  # an overflow becomes inf, which is refused just below
        array = np.asarray(rows, dtype=np.float64).astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidInput(f"'{field}' holds a number too large for float32 (|x| > 3.4e38)")
    return array


def parse_v1(payload: Any, *, num_features: int, max_rows: int) -> np.ndarray:
    """KServe V1 / TF-Serving request: ``{"instances": [[...], ...]}`` (``"inputs"`` accepted too)."""
    if not isinstance(payload, dict):
        raise BadRequest(f"request body must be a JSON object with 'instances', got {_describe(payload)}")
    key = "instances" if "instances" in payload else "inputs" if "inputs" in payload else None
    if key is None:
        raise InvalidInput(f"request has no 'instances' field (got fields {sorted(payload)[:10]}); "
                           "expected {\"instances\": [[...], ...]}")
    return rows_to_array(payload[key], field=key, num_features=num_features, max_rows=max_rows)
