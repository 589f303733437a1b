import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlray.errors import BadRequest, InvalidInput, PayloadTooLarge
from mlray.serving.validation import parse_json, parse_v1

F = 4


def parse(body: bytes | str, *, max_rows: int = 8):
    raw = body.encode() if isinstance(body, str) else body
    return parse_v1(parse_json(raw, max_bytes=10_000), num_features=F, max_rows=max_rows)


def test_valid_rows_become_float32():
    x = parse(json.dumps({"instances": [[1, 2, 3, 4.5], [0, 0, 0, 0]]}))
    assert x.dtype == np.float32 and x.shape == (2, 4) and x[0, 3] == 4.5


def test_inputs_key_is_accepted():
    assert parse(json.dumps({"inputs": [[1, 2, 3, 4]]})).shape == (1, 4)


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ("not json", BadRequest, "not valid JSON"),
        ("", BadRequest, "empty"),
        ("[1, 2]", BadRequest, "must be a JSON object"),
        ('{"rows": [[1,2,3,4]]}', InvalidInput, "no 'instances' field"),
        ('{"instances": 5}', InvalidInput, "must be a list of rows"),
        ('{"instances": []}', InvalidInput, "is empty"),
        ('{"instances": [5]}', InvalidInput, r"'instances\[0\]' must be a list"),
        ('{"instances": [[1,2,3]]}', InvalidInput, r"has 3 features; the model expects 4"),
        ('{"instances": [[1,2,3,"x"]]}', InvalidInput, r"'instances\[0\]\[3\]' must be a number"),
        ('{"instances": [[1,2,3,true]]}', InvalidInput, r"must be a number, got true"),
        ('{"instances": [[1,2,3,null]]}', InvalidInput, r"must be a number, got null"),
        ('{"instances": [[1,2,3,NaN]]}', InvalidInput, "NaN is not a number"),
        ('{"instances": [[1,2,3,Infinity]]}', InvalidInput, "Infinity is not a number"),
        ('{"instances": [[1,2,3,1e39]]}', InvalidInput, "too large for float32"),
        ('{"instances": [[1,2,3,4]' + ',[1,2,3,4]' * 8 + "]}", PayloadTooLarge, "9 rows; the limit is 8"),
    ],
)
def test_bad_requests_name_the_problem(body, error, message):
    with pytest.raises(error, match=message):
        parse(body)


def test_body_size_limit():
    with pytest.raises(PayloadTooLarge, match="bytes; the limit is 1024"):
        parse_json(b"x" * 2000, max_bytes=1024)


def test_status_codes_are_4xx():
    assert {BadRequest.status_code, InvalidInput.status_code, PayloadTooLarge.status_code} == {400, 422, 413}


# JSON as the prediction path reads it (orjson first, the standard library for what orjson refuses): the same
# values as the standard library for any JSON document.
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_parse_json_reads_what_the_standard_library_reads(value):
    body = json.dumps(value).encode()
    assert parse_json(body, max_bytes=10**6) == json.loads(body)


@pytest.mark.parametrize("body", [
    '{"instances": [[1, 2, 3, 4]]}'.encode("utf-16"),   # not UTF-8: orjson refuses, Python's parser reads it
    b'{"instances": [[123456789012345678901234567890, 2, 3, 4]]}',  # beyond 64 bits
    b'{"a": "\\ud800"}',                                  # a lone surrogate
    b'{"a": 1, "a": 2}',                                  # a repeated key: the last one wins
])
def test_json_orjson_refuses_or_reads_differently_is_read_as_before(body):
    assert parse_json(body, max_bytes=10**6) == json.loads(body)
