"""Backpressure and API keys, without Ray: the admission limits, the key file, and the ASGI guard."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest

from mlray.errors import ConfigError, Forbidden, Overloaded, RequestTimeout, Unauthorized
from mlray.serving.admission import Admission
from mlray.serving.auth import (
    AuthMiddleware,
    KeyFileWatch,
    KeyGuard,
    add_key_to_file,
    hash_key,
    is_public,
    load_key_hashes,
)


def test_admission_runs_queues_then_refuses_with_retry_after():
    async def scenario():
        admission = Admission(max_ongoing=2, max_queued=3, timeout_s=5, retry_after_s=2)
        release = asyncio.Event()
        outcomes: list[str] = []

        async def request():
            try:
                async with admission.admit():
                    await release.wait()
                outcomes.append("ok")
            except Overloaded as err:
                outcomes.append(f"503 retry {err.retry_after_s}")

        tasks = [asyncio.create_task(request()) for _ in range(8)]
        while admission.running + admission.waiting < 5 or len(outcomes) < 3:
            await asyncio.sleep(0.001)
        assert (admission.running, admission.waiting) == (2, 3)
        release.set()
        await asyncio.gather(*tasks)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert sorted(outcomes) == ["503 retry 2"] * 3 + ["ok"] * 5  # the queued ones all succeeded


def test_admission_times_out_waiting_and_running():
    async def scenario():
        admission = Admission(max_ongoing=1, max_queued=5, timeout_s=0.05, retry_after_s=1)
        async with admission.admit():
            with pytest.raises(RequestTimeout, match="waited 0.05 s for a free slot"):
                async with admission.admit():
                    pass
        async with admission.admit() as left:
            with pytest.raises(RequestTimeout, match="longer than 0.05 s"):
                await admission.run(asyncio.sleep(1), left_s=left)
        assert (admission.running, admission.waiting) == (0, 0)

    asyncio.run(scenario())


def test_keys_from_env_and_file_are_held_as_hashes(tmp_path, monkeypatch):
    key = add_key_to_file(tmp_path / "keys")
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o600
    assert key not in (tmp_path / "keys").read_text()
    monkeypatch.setenv("TEST_KEYS", "plain-key-1, " + hash_key("plain-key-2"))
    hashes = load_key_hashes(keys_env="TEST_KEYS", keys_file=str(tmp_path / "keys"))
    assert hashes == {hash_key(key), hash_key("plain-key-1"), hash_key("plain-key-2")}


@pytest.mark.parametrize(("content", "message"), [
    ("plain-key\n", "entry 1 is not a 'sha256:<hex>' hash"),
    ("sha256:1234\n", "not 'sha256:' followed by 64 hex digits"),
    ("# only a comment\n", "no API key was found"),
])
def test_bad_key_files_name_the_problem(tmp_path, content, message):
    (tmp_path / "keys").write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_key_hashes(keys_env=None, keys_file=str(tmp_path / "keys"))


def test_missing_key_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_key_hashes(keys_env=None, keys_file=str(tmp_path / "nope"))


def test_guard_fails_closed_then_checks_keys():
    guard = KeyGuard()
    assert isinstance(guard.check("Bearer anything"), Forbidden)  # not configured yet: nothing gets through
    guard.configure(enabled=True, hashes={hash_key("right")})
    assert isinstance(guard.check(None), Unauthorized)
    assert isinstance(guard.check("Basic cmlnaHQ="), Unauthorized)
    assert isinstance(guard.check("Bearer "), Unauthorized)
    assert isinstance(guard.check("Bearer wrong"), Forbidden)
    assert guard.check("Bearer right") is None and guard.check("bearer right") is None
    guard.configure(enabled=False)
    assert guard.check(None) is None


def test_public_paths():
    assert all(is_public(p) for p in ["/healthz", "/v2/health/live", "/v2/health/ready", "/v2/models/x/ready",
                                      "/docs", "/openapi.json", "/ping"])
    assert not any(is_public(p) for p in ["/v1/models/x:predict", "/v2/models/x/infer", "/invocations",
                                          "/v1/models/x", "/v2/models/x", "/v1/models/x/status", "/v1/ready"])


def test_middleware_answers_in_each_protocols_shape():
    guard = KeyGuard()
    guard.configure(enabled=True, hashes={hash_key("right")})
    reached: list[str] = []

    async def inner(scope, receive, send):
        reached.append(scope["path"])

    middleware = AuthMiddleware(inner, guard=lambda: guard)

    def call(path, headers=()):
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        asyncio.run(middleware({"type": "http", "path": path, "headers": list(headers)}, None, send))
        return sent

    refused = call("/invocations")
    assert refused[0]["status"] == 401 and (b"www-authenticate", b'Bearer realm="mlray"') in refused[0]["headers"]
    assert json.loads(refused[1]["body"])["error_code"] == "UNAUTHENTICATED"
    wrong = call("/v2/models/digits/infer", [(b"authorization", b"Bearer nope")])
    assert wrong[0]["status"] == 403 and "not valid" in json.loads(wrong[1]["body"])["error"]
    assert call("/v2/models/digits/infer", [(b"authorization", b"Bearer right")]) == []
    assert call("/healthz") == []
    assert reached == ["/v2/models/digits/infer", "/healthz"]


def test_key_file_watch_follows_added_revoked_and_broken_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "env-key")
    path = tmp_path / "keys"
    first = add_key_to_file(path)
    watch = KeyFileWatch(keys_env="TEST_KEYS", keys_file=str(path))
    assert watch.changed() is None  # nothing changed since the replica loaded the file

    second = add_key_to_file(path)
    assert watch.changed() == {hash_key(first), hash_key(second), hash_key("env-key")}
    assert watch.changed() is None

    path.write_text(hash_key(second) + "\n")  # first revoked: its line deleted
    assert watch.changed() == {hash_key(second), hash_key("env-key")}

    path.write_text(hash_key(second) + "\nnot-a-hash\n")  # a bad line: the keys in force stay
    assert watch.changed() is None

    path.unlink()  # no file: only the environment's keys
    assert watch.changed() == {hash_key("env-key")}
    monkeypatch.delenv("TEST_KEYS")
    path.write_text("")  # nothing anywhere: an empty set, and the guard refuses every key
    assert watch.changed() == frozenset()
    guard = KeyGuard()
    guard.configure(enabled=True, hashes=frozenset())
    refused = guard.check(f"Bearer {second}")
    assert isinstance(refused, Forbidden) and str(refused) == "the API key is not valid for this server"


def test_admission_sees_requests_that_arrive_together_even_if_none_yields():
    """A request whose handler never yields (parse, then a large model call) must not hide the ones behind it."""
    import time

    async def main() -> list:
        admission = Admission(max_ongoing=1, max_queued=1, timeout_s=5, retry_after_s=1)

        async def handle() -> str:
            async with admission.admit():
                time.sleep(0.01)  # holds the event loop, as predict_proba does
                return "ok"

        return await asyncio.gather(*(handle() for _ in range(4)), return_exceptions=True)

    results = asyncio.run(main())
    assert results[:2] == ["ok", "ok"]  # the running one and the queued one
    assert all(isinstance(r, Overloaded) for r in results[2:])
