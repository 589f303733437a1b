"""MLflow's scoring protocol, what ``mlflow models serve`` answers at ``POST /invocations``
(``mlflow/pyfunc/scoring_server/__init__.py`` in MLflow 3.17), parsed into the same (N, F) float32 array the
V1 route makes, columns in the model's feature order.

The scoring server takes three content types: JSON (``dataframe_split``, ``dataframe_records``,
``instances``, ``inputs``), CSV (``text/csv``, as ``DataFrame.to_csv()`` writes it) and Parquet
(``application/vnd.apache.parquet``, as ``DataFrame.to_parquet()`` writes it). MLflow reads them with
pandas; these parsers do not (pandas costs more than the model call for a single row): CSV with the standard
library, Parquet with pyarrow, imported only when a Parquet body comes. The tests check them against
MLflow's own parsers. A charset other than UTF-8 is refused with 415, as MLflow does.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np

from mlray.errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from mlray.serving.validation import _describe, _to_float32, check_row_list, parse_json, rows_as_float32

_MISSING = object()
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
JSON = "application/json"


def _names(names: list[str]) -> str:
    shown = ", ".join(json.dumps(name) for name in names[:6])
    return f"[{shown}{', ...' if len(names) > 6 else ''}] ({len(names)} in all)"


def parse_body(body: bytes, content_type: str | None, *, feature_names: list[str], max_rows: int,
               max_bytes: int) -> np.ndarray:
    """A request body of any content type the scoring server takes -> (N, F) float32.

    A missing or other content type is read as JSON (mlray always did; curl's default form type included).
    """
    mime, _, parameters = (content_type or JSON).partition(";")
    mime = mime.strip().lower()
    for pair in parameters.split(";"):
        key, _, value = pair.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"the charset is {value.strip()!r}; this server reads UTF-8 only, as "
                                       "MLflow's scoring server does")
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {max_bytes}")
    if mime == CSV:
        return parse_csv(body, feature_names=feature_names, max_rows=max_rows)
    if mime == PARQUET:
        return parse_parquet(body, feature_names=feature_names, max_rows=max_rows)
    return parse_invocations(parse_json(body, max_bytes=max_bytes), feature_names=feature_names, max_rows=max_rows)


def parse_csv(body: bytes, *, feature_names: list[str], max_rows: int) -> np.ndarray:
    """``DataFrame.to_csv()`` text: a header row of column names (any order; a leading unnamed column, the
    index ``to_csv`` writes, is skipped), then one line per row. Blank lines are skipped, as pandas does."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRequest(f"the CSV body is not UTF-8: {err}") from None
    try:
        lines = [row for row in csv.reader(io.StringIO(text)) if row and row != [""]]
    except csv.Error as err:
        raise BadRequest(f"the CSV body cannot be read: {err}") from None
    if not lines:
        raise BadRequest("the CSV body is empty; expected a header row of column names, then rows "
                         "(pandas' DataFrame.to_csv(index=False))")
    header, rows = lines[0], lines[1:]
    skip = 1 if header[0] == "" else 0  # to_csv()'s index column
    order = _column_order(header[skip:], field="csv header", feature_names=feature_names)
    check_row_list(rows, field="csv rows", max_rows=max_rows, kind="rows", one="row after the header")
    f = len(feature_names)
    values: list[Any] = []
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise InvalidInput(f"csv row {i + 1} has {len(row)} fields; the header has {len(header)}")
        values += [_csv_number(cell) for cell in row[skip:]]
    columns = header[skip:]
    x = _to_float32(values, shape=(len(rows), f),
                    where=lambda k: f"csv row {k // f + 1}, column {json.dumps(columns[k % f])}")
    return x if order is None else np.ascontiguousarray(x[:, order])


def _csv_number(cell: str) -> float | str:
    """A CSV cell as a number (as pandas reads it); what is not one is left for _to_float32 to name."""
    text = cell.strip()
    if "_" in text:  # Python's float() takes "1_000"; pandas does not
        return cell
    try:
        number = int(text)
    except ValueError:
        try:
            return float(text) if text.lower() not in ("nan", "-nan", "+nan") else math.nan
        except ValueError:
            return cell
    return number


def parse_parquet(body: bytes, *, feature_names: list[str], max_rows: int) -> np.ndarray:
    """``DataFrame.to_parquet()`` bytes -> (N, F): every feature as a numeric column, in any order; pandas'
    index columns (``__index_level_0__``) are skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(body))
    except (pa.ArrowException, OSError) as err:
        raise BadRequest(f"the body is not a readable Parquet file: {err}") from None
    columns = [name for name in table.column_names if not name.startswith("__index_level_")]
    _column_order(columns, field="parquet columns", feature_names=feature_names)
    if table.num_rows == 0:
        raise InvalidInput("the Parquet table has no rows; send at least one")
    if table.num_rows > max_rows:
        raise PayloadTooLarge(f"the Parquet table has {table.num_rows} rows; the limit is {max_rows} per request")
    parts = []
    for name in feature_names:
        column = table.column(name)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise InvalidInput(f"parquet column {json.dumps(name)} is of type {column.type}; expected numbers")
        if column.null_count:
            raise InvalidInput(f"parquet column {json.dumps(name)} has {column.null_count} missing value(s)")
        parts.append(column.to_numpy().astype(np.float64))
    with np.errstate(over="ignore"):
        x = np.stack(parts, axis=1).astype(np.float32)  # (N, F)
    if not np.isfinite(x).all():
        row, col = np.argwhere(~np.isfinite(x))[0]
        raise InvalidInput(f"parquet column {json.dumps(feature_names[col])} row {row} is "
                           f"{parts[col][row]!r}; only finite numbers within float32's range are accepted")
    return x


MLFLOW_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
_SPLIT_FIELDS = frozenset({"columns", "data", "index"})


def parse_invocations(payload: Any, *, feature_names: list[str], max_rows: int) -> np.ndarray:
    """A JSON body as ``mlflow models serve`` takes it -> (N, F) float32, columns in ``feature_names`` order.

    Named columns may come in any order; positional rows (``instances``/``inputs`` as lists of lists,
    ``dataframe_split`` without ``columns``) must hold all F features in the model's order. ``params``
    is accepted and ignored: this model has no parameters, and MLflow ignores them too in that case.
    """
    if not isinstance(payload, dict):
        raise BadRequest(f"request body must be a JSON object with exactly one of the fields "
                         f"{list(MLFLOW_FORMATS)}, got {_describe(payload)}")
    present = [key for key in MLFLOW_FORMATS if key in payload]
    if len(present) != 1:
        raise InvalidInput(f"request must have exactly one of the input fields {list(MLFLOW_FORMATS)}; got "
                           f"fields {sorted(payload)[:10]}. Example: "
                           '{"dataframe_split": {"columns": [...], "data": [[...]]}}')
    params = payload.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidInput(f"'params' must be an object of name/value pairs, got {_describe(params)}")
    key = present[0]
    value = payload[key]
    if key == "dataframe_split":
        return _split(value, feature_names=feature_names, max_rows=max_rows)
    if key == "inputs" and isinstance(value, dict):
        return _columns(value, field=key, feature_names=feature_names, max_rows=max_rows)
    if key == "dataframe_records" or (isinstance(value, list) and value and isinstance(value[0], dict)):
        return _records(value, field=key, feature_names=feature_names, max_rows=max_rows)
    return rows_as_float32(value, field=key, num_features=len(feature_names), max_rows=max_rows)


def _split(split: Any, *, feature_names: list[str], max_rows: int) -> np.ndarray:
    field = "dataframe_split"
    if not isinstance(split, dict):
        raise InvalidInput(f"'{field}' must be an object {{\"columns\": [...], \"data\": [[...]]}}, "
                           f"got {_describe(split)}")
    unknown = sorted(set(split) - _SPLIT_FIELDS)
    if unknown or "data" not in split:
        what = f"has the unknown field {unknown[0]!r}" if unknown else "has no 'data'"
        raise InvalidInput(f"'{field}' {what}; expected 'data' and optionally 'columns' and 'index' "
                           "(pandas' DataFrame.to_dict(orient='split'))")
    columns = split.get("columns")
    order = None if columns is None else _column_order(columns, field=f"{field}.columns", feature_names=feature_names)
    x = rows_as_float32(split["data"], field=f"{field}.data", num_features=len(feature_names), max_rows=max_rows)
    index = split.get("index")
    if index is not None and (not isinstance(index, list) or len(index) != len(x)):
        got = f"{len(index)} entries" if isinstance(index, list) else _describe(index)
        raise InvalidInput(f"'{field}.index' must be a list with one entry per row ({len(x)}), got {got}")
    return x if order is None else np.ascontiguousarray(x[:, order])  # (N, F) in the model's order


def _column_order(columns: Any, *, field: str, feature_names: list[str]) -> list[int] | None:
    """Where each model feature sits in ``columns``; None when they are already in the model's order."""
    if columns == feature_names:
        return None
    if not isinstance(columns, list):
        raise InvalidInput(f"'{field}' must be a list of column names, got {_describe(columns)}")
    known = set(feature_names)
    position: dict[str, int] = {}
    for i, column in enumerate(columns):
        if not isinstance(column, str) or column not in known:
            raise InvalidInput(f"'{field}[{i}]' is {_describe(column)}, not a feature of this model; "
                               f"expected names from {_names(feature_names)}")
        if column in position:
            raise InvalidInput(f"'{field}[{i}]' {column!r} repeats '{field}[{position[column]}]'")
        position[column] = i
    missing = [name for name in feature_names if name not in position]
    if missing:
        raise InvalidInput(f"'{field}' lacks the feature(s) {_names(missing)}; the model needs all "
                           f"{len(feature_names)}")
    return [position[name] for name in feature_names]


def _records(records: Any, *, field: str, feature_names: list[str], max_rows: int) -> np.ndarray:
    """``[{column: value, ...}, ...]`` -> (N, F)."""
    check_row_list(records, field=field, max_rows=max_rows, kind="records {column: value}",
                   one=f"record of {len(feature_names)} columns")
    f = len(feature_names)
    values = _record_values(records, feature_names)
    if values is None:  # some record is not exactly the features: find it and name the problem
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise InvalidInput(f"'{field}[{i}]' must be a record {{column: value}}, got {_describe(record)}")
            _check_keys(record, field=f"{field}[{i}]", feature_names=feature_names)
        values = [record[name] for record in records for name in feature_names]
    return _to_float32(values, shape=(len(records), f),
                       where=lambda k: f"{field}[{k // f}][{json.dumps(feature_names[k % f])}]")


def _record_values(records: list[Any], feature_names: list[str]) -> list[Any] | None:
    """Row-major values when every record is a dict of exactly the features (no missing, no unknown key)."""
    f = len(feature_names)
    if not all(type(record) is dict and len(record) == f for record in records):
        return None
    try:
        return [record[name] for record in records for name in feature_names]
    except KeyError:
        return None


def _check_keys(record: dict[str, Any], *, field: str, feature_names: list[str]) -> None:
    missing = [name for name in feature_names if name not in record]
    if missing:
        raise InvalidInput(f"'{field}' has no column {json.dumps(missing[0])} ({len(missing)} missing); "
                           f"the model needs all of {_names(feature_names)}")
    known = set(feature_names)
    unknown = [key for key in record if key not in known]
    if unknown:
        raise InvalidInput(f"'{field}' has the column {_describe(unknown[0])}, not a feature of this model; "
                           f"expected names from {_names(feature_names)}")


def _columns(columns: dict[str, Any], *, field: str, feature_names: list[str], max_rows: int) -> np.ndarray:
    """``{column: [values...]}`` (or ``{column: value}`` for one row, as MLflow takes it) -> (N, F)."""
    f = len(feature_names)
    cols = [columns.get(name, _MISSING) for name in feature_names]
    if len(columns) != f or _MISSING in cols:
        _check_keys(columns, field=field, feature_names=feature_names)  # raises: names the missing or unknown
    if not any(isinstance(col, list) for col in cols):  # one row of scalars
        return _to_float32(cols, shape=(1, f), where=lambda k: f"{field}[{json.dumps(feature_names[k])}]")
    first = next(i for i, col in enumerate(cols) if isinstance(col, list))
    n = len(cols[first])
    for name, col in zip(feature_names, cols, strict=True):
        if not isinstance(col, list) or len(col) != n:
            got = f"{len(col)} values" if isinstance(col, list) else _describe(col)
            raise InvalidInput(f"'{field}[{json.dumps(name)}]' must be a list of {n} values, as "
                               f"'{field}[{json.dumps(feature_names[first])}]' is, got {got}")
    if n == 0:
        raise InvalidInput(f"'{field}' has no rows; send at least one value per column")
    if n > max_rows:
        raise PayloadTooLarge(f"'{field}' has {n} rows; the limit is {max_rows} per request")
    values = [value for col in cols for value in col]  # column-major: (F, N)
    array = _to_float32(values, shape=(f, n), where=lambda k: f"{field}[{json.dumps(feature_names[k // n])}][{k % n}]")
    return np.ascontiguousarray(array.T)


def invocations_response(probabilities: np.ndarray) -> dict[str, Any]:
    """What ``mlflow models serve`` answers for an ndarray prediction: ``predictions_to_json`` turns it into
    ``{"predictions": ndarray.tolist()}``."""
    return {"predictions": np.asarray(probabilities).tolist()}


