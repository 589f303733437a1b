"""A replica's HTTP answers leave in one write: status line, headers and body together (written for uvicorn 0.54).

Serve's direct ingress runs uvicorn in each replica, and uvicorn writes a response's head as soon as the app
sends ``http.response.start``, its body at ``http.response.body``: two writes. A replica killed between them
has sent HAProxy a head without a body, which HAProxy has already passed on to the client: the client reads a
truncated answer (``IncompleteRead``; seen as ``SD--`` with 337 of 617 bytes in HAProxy's log, in
tests/faults/test_serving_faults.py's SIGKILL test). Holding the head until the body is there makes that
instant send nothing at all, which HAProxy replays on another replica (``retry-on empty-response``).

Each response is held only until its first body message; a streamed body goes out chunk by chunk after that.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_PATCHED = "__mlray_one_write__"


class _Held:
    """Stands in for a connection's transport while a response's head waits for its body: writes are kept,
    anything else (``is_closing``, ``get_extra_info``...) goes to the real transport; ``close`` sends first."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.kept: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.kept.append(bytes(data))

    def release(self) -> Any:
        if self.kept:
            self.real.write(b"".join(self.kept))
            self.kept.clear()
        return self.real

    def close(self) -> None:
        self.release().close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _one_write(send: Any) -> Any:
    async def send_whole(self: Any, message: Any) -> None:
        kind = message.get("type")
        if kind == "http.response.start" and not self.response_started:
            self.transport = _Held(self.transport)
        try:
            await send(self, message)
        finally:
            held = self.transport
            if isinstance(held, _Held) and kind != "http.response.start":
                self.transport = held.release()  # the head goes out with the first body message

    setattr(send_whole, _PATCHED, True)
    return send_whole


def write_answers_whole() -> list[str]:
    """Make this process's uvicorn send each response's head with its body; returns the patched classes.

    Idempotent. An implementation without the attributes this relies on is left alone, with a warning.
    """
    patched = []
    for module in ("uvicorn.protocols.http.httptools_impl", "uvicorn.protocols.http.h11_impl"):
        try:
            cycle = __import__(module, fromlist=["RequestResponseCycle"]).RequestResponseCycle
        except ImportError:  # httptools not installed: that implementation is never used
            continue
        if getattr(cycle.send, _PATCHED, False):
            patched.append(f"{module}.RequestResponseCycle")
            continue
        relied_on = {"transport", "response_started"}
        if not relied_on <= set(cycle.__init__.__code__.co_names) | set(cycle.send.__code__.co_names):
            logger.warning("%s.RequestResponseCycle is not the one mlray was written for (uvicorn 0.54): its "
                           "answers keep their two writes (head, then body)", module)
            continue
        cycle.send = _one_write(cycle.send)
        patched.append(f"{module}.RequestResponseCycle")
    return patched
