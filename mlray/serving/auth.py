"""API keys for the Serve app: ``Authorization: Bearer <key>`` on every route that is not public.

Keys are held only as sha256 hashes. They come from an environment variable (comma-separated keys or
``sha256:<hex>`` hashes) or a secret file (one ``sha256:<hex>`` per line, ``#`` comments; written by
``mlray keys create``), never from the Serve YAML, which only says where to look.

The guard is an ASGI middleware, so a route is protected unless the route table (``routes.is_public``)
says it is public: a new route cannot be forgotten. It fails closed: until a replica has configured it,
every protected route answers 401.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

from mlray.errors import ConfigError, Forbidden, MlrayError, Unauthorized
from mlray.serving.http import render_error, route_path, send_response
from mlray.serving.routes import is_public, protocol_of

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "mlr_" + secrets.token_urlsafe(32)


def _entries(text: str, *, source: str, allow_plain: bool) -> set[str]:
    hashes = set()
    for number, raw in enumerate(text.replace(",", "\n").splitlines(), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry.startswith("sha256:"):
            digest = entry.removeprefix("sha256:")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ConfigError(f"{source} entry {number} is not 'sha256:' followed by 64 hex digits")
            hashes.add("sha256:" + digest.lower())
        elif allow_plain:
            hashes.add(hash_key(entry))
        else:
            raise ConfigError(f"{source} entry {number} is not a 'sha256:<hex>' hash; the file holds hashes only")
    return hashes


def load_key_hashes(*, keys_env: str | None, keys_file: str | None, required: bool = True) -> frozenset[str]:
    """Every accepted key's hash, from the environment variable and the file; an empty result is an error
    unless ``required`` is False."""
    hashes: set[str] = set()
    if keys_env and os.environ.get(keys_env):
        hashes |= _entries(os.environ[keys_env], source=f"${keys_env}", allow_plain=True)
    if keys_file:
        path = Path(keys_file).expanduser()
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"auth.keys_file {str(path)!r} cannot be read: {err.strerror}") from None
        hashes |= _entries(text, source=f"auth.keys_file {str(path)!r}", allow_plain=False)
    if not hashes and required:
        where = " or ".join(x for x in (f"${keys_env}" if keys_env else "", keys_file or "") if x)
        raise ConfigError(f"auth is enabled but no API key was found in {where}; create one with `mlray keys create`")
    return frozenset(hashes)


class KeyFileWatch:
    """Re-reads ``auth.keys_file`` when it changes, so that a key added with ``mlray keys create`` or revoked by
    deleting its line reaches running replicas within a heartbeat, with no redeploy.

    A file that is missing or holds no key leaves only the environment's keys (none: every request is
    refused); a file with a malformed line is not used and the keys in force stay, since one bad line must
    not lock every client out. Both are logged.
    """

    def __init__(self, *, keys_env: str | None, keys_file: str) -> None:
        self.keys_env = keys_env
        self.path = Path(keys_file).expanduser()
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def changed(self) -> frozenset[str] | None:
        """The new set of key hashes if the file changed since the last call, else None."""
        stamp = self._stamp()
        if stamp == self._seen:
            return None
        self._seen = stamp
        env_only = load_key_hashes(keys_env=self.keys_env, keys_file=None, required=False)
        try:
            text = self.path.read_text()
        except OSError as err:
            logger.warning("auth.keys_file %s cannot be read (%s): only $%s's keys are accepted now",
                           self.path, err.strerror, self.keys_env)
            return env_only
        try:
            hashes = _entries(text, source=f"auth.keys_file {str(self.path)!r}", allow_plain=False)
        except ConfigError as err:
            logger.error("auth.keys_file changed but is not used: %s; the keys in force stay", err)
            return None
        logger.info("API keys reloaded from %s: %d in the file, %d from $%s", self.path, len(hashes),
                    len(env_only), self.keys_env)
        return frozenset(hashes | env_only)


def add_key_to_file(path: Path) -> str:
    """Create a key, append its hash to ``path`` (mode 600); returns the key, which is shown once."""
    key = new_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as handle:
        handle.write(hash_key(key) + "\n")
    return key


class KeyGuard:
    """What the middleware checks against; a replica configures it once its keys are loaded."""

    def __init__(self) -> None:
        self.enabled = True  # fail closed until configured
        self._hashes: frozenset[str] = frozenset()

    def configure(self, *, enabled: bool, hashes: Iterable[str] = ()) -> None:
        self._hashes = frozenset(hashes)
        self.enabled = enabled

    def check(self, authorization: str | None) -> MlrayError | None:
        """None when allowed, else the refusal: :class:`Unauthorized` without a key, :class:`Forbidden` with a
        wrong one."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if not authorization or scheme.lower() != "bearer" or not token.strip():
            return Unauthorized("this route needs an API key: send 'Authorization: Bearer <key>'")
        presented = hash_key(token.strip())
        # compare against every hash, so the time taken does not say which one nearly matched
        if not any([hmac.compare_digest(presented, known) for known in self._hashes]):
            return Forbidden("the API key is not valid for this server")
        return None


class AuthMiddleware:
    """ASGI middleware: public paths pass; the rest need a valid bearer key.

    ``guard`` is looked up on every request: Serve ships the FastAPI app to the replica as a copy, so a
    guard object captured here would not be the one the replica configures.
    """

    def __init__(self, app: ASGIApp, *, guard: Callable[[], KeyGuard]) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(route_path(scope)):
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        refused = self.guard().check(authorization)
        if refused is None:
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        status, body, headers = render_error(protocol_of(path), refused)
        await send_response(send, status, body, headers)
