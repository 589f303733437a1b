"""Prediction requests checked against the model's signature, before any tensor is made.

Every problem becomes an :class:`~mlray.errors.MlrayError` whose message names the field, the value and
what was expected; the HTTP layer turns it into a 4xx. Nothing here needs Ray or a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from mlray.errors import BadRequest, InvalidInput, PayloadTooLarge

_DIGITS = bytes(0x31 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))  # each digit to "1", the rest to " "
_DIGIT_RUN = b"1" * 19


def parse_json(body: bytes, *, max_bytes: int) -> Any:
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {max_bytes}")
    if not body.strip():
        raise BadRequest("request body is empty; expected a JSON object such as {\"instances\": [[...]]}")
    # orjson parses a body several times faster than the standard library (bench/README.md). It refuses what
    # is not strict UTF-8 JSON (NaN, Infinity, other encodings, lone surrogates), and reads an integer beyond
    # 64 bits (19+ digits) as a float: those go to the standard parser, which reads them or says what is
    # wrong, as before.
    if _DIGIT_RUN not in body.translate(_DIGITS):  # cheaper than a regular expression
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
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


# Exact types: bool is an int subclass and true/false are not features; JSON decoding gives exactly these.
_NUMBERS = frozenset({int, float})
_INTEGERS = frozenset({int})
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _to_float32(values: list[Any], *, shape: tuple[int, int], where: Callable[[int], str],
                integer_range: tuple[int, int] | None = None) -> np.ndarray:
    """Flat JSON numbers -> float32 array of ``shape``; a bad value is named through ``where(index)``.

    The common case costs one C-level type scan and one conversion; the per-value loop only runs to
    find and name a problem.
    """
    accepted = _INTEGERS if integer_range else _NUMBERS
    if not accepted.issuperset(map(type, values)):
        for k, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInput(f"'{where(k)}' must be a number, got {_describe(value)}")
            if integer_range and not isinstance(value, int):
                raise InvalidInput(f"'{where(k)}' is {value!r}; an integer datatype takes whole numbers only")
    if integer_range and values:
        low, high = integer_range
        if min(values) < low or max(values) > high:  # exact on Python ints, before any float rounding
            k = next(k for k, value in enumerate(values) if not low <= value <= high)
            raise InvalidInput(f"'{where(k)}' is {_describe(values[k])}; the datatype holds {low}..{high}")
    # The same conversion as rows_to_array (V1), so every protocol gives bit-identical arrays.
    if len(values) <= 128:
        # A few values (single rows): min/max/sum in C are cheaper than np.errstate + np.isfinite. Anything
        # outside float32's range fails the bounds, a NaN makes the sum NaN; both take the checks below.
        if -_FLOAT32_MAX <= min(values) and max(values) <= _FLOAT32_MAX and sum(values) == sum(values):
            return np.asarray(values, dtype=np.float64).astype(np.float32).reshape(shape)
    try:
        wide = np.asarray(values, dtype=np.float64)
        # beyond float32's largest value is refused even where the cast would round it down to that value
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, refused just below
            array = np.where(np.abs(wide) <= _FLOAT32_MAX, wide, np.inf).astype(np.float32)
    except OverflowError:  # an integer beyond float64: JSON allows any number of digits
        array = np.array([math.inf if abs(value) > _FLOAT32_MAX else 0.0 for value in values], dtype=np.float32)
    if not np.isfinite(array).all():
        k = int(np.flatnonzero(~np.isfinite(array))[0])
        if isinstance(values[k], int) or math.isfinite(values[k]):  # an int is finite, however large
            raise InvalidInput(f"'{where(k)}' is {_describe(values[k])}, too large for float32 (|x| > 3.4e38)")
        raise InvalidInput(f"'{where(k)}' is {values[k]}; only finite numbers are accepted")
    return array.reshape(shape)


def rows_as_float32(rows: Any, *, field: str, num_features: int, max_rows: int) -> np.ndarray:
    """``[[F numbers], ...]`` -> (N, F) float32, named ``field[i][j]`` as :func:`rows_to_array` (V1) names them."""
    if not (type(rows) is list and 0 < len(rows) <= max_rows
            and all(type(row) is list and len(row) == num_features for row in rows)):
        # Not plain rows of F: rows_to_array's checks say what is wrong, in V1's words.
        return rows_to_array(rows, field=field, num_features=num_features, max_rows=max_rows)
    values = [value for row in rows for value in row]
    return _to_float32(values, shape=(len(rows), num_features),
                       where=lambda k: f"{field}[{k // num_features}][{k % num_features}]")


def check_row_list(value: Any, *, field: str, max_rows: int, kind: str, one: str) -> None:
    """``value`` is a non-empty list of at most ``max_rows`` items (``kind``, e.g. "rows"; ``one``, e.g.
    "row of 64 numbers", names an item in the messages)."""
    if not isinstance(value, list):
        raise InvalidInput(f"'{field}' must be a list of {kind}, got {_describe(value)}")
    if not value:
        raise InvalidInput(f"'{field}' is empty; send at least one {one}")
    if len(value) > max_rows:
        raise PayloadTooLarge(f"'{field}' has {len(value)} rows; the limit is {max_rows} per request")


def rows_to_array(rows: Any, *, field: str, num_features: int, max_rows: int) -> np.ndarray:
    """A list of rows of ``num_features`` finite numbers -> (N, F) float32 array."""
    check_row_list(rows, field=field, max_rows=max_rows, kind="rows", one=f"row of {num_features} numbers")
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
    return rows_as_float32(payload[key], field=key, num_features=num_features, max_rows=max_rows)
