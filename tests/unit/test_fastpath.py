"""The plain-ASGI prediction routes: which paths they take, and errors in each protocol's shape."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.responses import JSONResponse

from mlray.errors import InvalidInput, Overloaded
from mlray.serving.fastpath import FastPredict, encode, match


@pytest.mark.parametrize(("path", "expected"), [
    ("/v1/models/digits:predict", ("v1", "digits")),
    ("/v2/models/digits/infer", ("v2", "digits")),
    ("/invocations", ("mlflow", "")),
    ("/v1/models/:predict", None),
    ("/v1/models/a/b:predict", None),
    ("/v2/models/a/b/infer", None),
    ("/v1/models/digits", None),
    ("/invocations/", None),
])
def test_match_takes_what_fastapi_would_route_to_the_prediction_handlers(path, expected):
    assert match(path) == expected


def test_encode_renders_like_starlettes_json_response():
    body = {"predictions": [[0.25, 0.75]], "labels": ["é"], "model_version": 3}
    assert encode(body) == JSONResponse(body).body


@pytest.mark.parametrize("body", [
    {"predictions": [[1.2e-05, 0.99998, 1e16]], "id": None, "ok": True},  # exponents are written differently
    {"big": 123456789012345678901234567890},                             # beyond orjson's 64 bits
    {1: "a non-string key"},
])
def test_encode_is_read_back_as_starlette_would_have_written_it(body):
    assert json.loads(encode(body)) == json.loads(JSONResponse(body).body)


class Server:
    """Answers like PredictionCore.answer: reads the body, returns (body, headers) or raises."""

    max_body_bytes = 1024

    async def answer(self, call: Any) -> Any:
        if call.route.kind == "v2":
            raise InvalidInput("'inputs' is missing")
        if call.route.kind == "mlflow":
            raise InvalidInput("'dataframe_split' is missing")
        payload = json.loads(await call.read_body())
        if payload.get("fail") == "input":
            raise InvalidInput("instances[0] has 3 values; expected 4")
        if payload.get("fail") == "busy":
            raise Overloaded("the server is at capacity", retry_after_s=2)
        if payload.get("fail") == "bug":
            raise KeyError("oops")
        return {"name": call.params["name"], "key": call.headers.get("x-mlray-key")}, {"x-model-version": "7"}


def call(path: str, body: bytes, *, method: str = "POST", server: Any = Server(), chunk: int = 0) -> dict:
    sent: list[dict] = []
    passed: list[str] = []
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    messages = [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    async def downstream(scope: Any, receive: Any, send: Any) -> None:
        passed.append(scope["path"])

    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "headers": [(b"x-mlray-key", b"alice"), (b"content-type", b"application/json")]}
    asyncio.run(FastPredict(downstream, core=lambda: server)(scope, receive, send))
    if passed:
        return {"passed": True}
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return {"status": sent[0]["status"], "headers": headers, "body": json.loads(sent[1]["body"])}


def test_a_prediction_is_answered_with_the_servers_body_and_headers():
    answer = call("/v1/models/digits:predict", b'{"instances": []}', chunk=5)  # a body in several messages
    assert answer["status"] == 200 and answer["body"] == {"name": "digits", "key": "alice"}
    assert answer["headers"]["x-model-version"] == "7" and answer["headers"]["content-type"] == "application/json"
    assert int(answer["headers"]["content-length"]) == len(encode(answer["body"]))


def test_errors_come_in_each_protocols_shape():
    v1 = call("/v1/models/digits:predict", b'{"fail": "input"}')
    assert v1["status"] == 422 and v1["body"] == {"error": "instances[0] has 3 values; expected 4"}
    v2 = call("/v2/models/digits/infer", b"{}")
    assert v2["status"] == 400 and v2["body"] == {"error": "'inputs' is missing"}
    mlflow = call("/invocations", b"{}")
    assert mlflow["status"] == 400 and mlflow["body"]["error_code"] == "BAD_REQUEST"
    busy = call("/v1/models/digits:predict", b'{"fail": "busy"}')
    assert busy["status"] == 503 and busy["headers"]["retry-after"] == "2"
    bug = call("/v1/models/digits:predict", b'{"fail": "bug"}')
    assert bug["status"] == 500 and bug["body"] == {"error": "internal error (KeyError); see the replica's log"}


def test_a_body_over_the_limit_is_refused_without_reading_it_all():
    answer = call("/v1/models/digits:predict", b"x" * 5000, chunk=600)
    assert answer["status"] == 413 and "the limit is 1024" in answer["body"]["error"]


def test_everything_else_goes_on_to_fastapi():
    assert call("/v1/models/digits", b"", method="GET") == {"passed": True}
    assert call("/v1/models/digits:predict", b"", method="GET") == {"passed": True}  # FastAPI answers 405
    assert call("/healthz", b"", method="POST") == {"passed": True}
    assert call("/v1/models/digits:predict", b"{}", server=None) == {"passed": True}  # replica not started
