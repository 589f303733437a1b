"""A replica's answers leave in one write (mlray/_ray/onewrite.py), on a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from tests.helpers import free_port, wait_for

BODY = b'{"predictions": [1]}'


class HeldBody:
    """An ASGI app that sends its head, then waits for the test to let the body go."""

    def __init__(self) -> None:
        self.head_sent = threading.Event()
        self.release = threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]})
        self.head_sent.set()
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": BODY})


@pytest.fixture(params=["httptools", "h11"])
def server(request):
    import uvicorn

    from mlray._ray.onewrite import write_answers_whole

    assert write_answers_whole()  # uvicorn 0.54 has the attributes the patch relies on
    app, port = HeldBody(), free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=request.param, lifespan="off",
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_for(lambda: srv.started, timeout=20, what="uvicorn started")
    yield app, port
    srv.should_exit = True
    thread.join(timeout=20)


def _request(close: bool = False) -> bytes:
    return (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
            + (b"Connection: close\r\n" if close else b"") + b"\r\n{}")


def _read_answer(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(BODY):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def test_the_head_waits_for_the_body_and_both_arrive_whole(server):
    app, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for close in (False, True):  # a keep-alive answer, then one that closes the connection after it
            app.head_sent.clear()
            app.release.clear()
            sock.sendall(_request(close))
            assert app.head_sent.wait(10)
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):  # the head was sent by the app, but nothing left the process
                sock.recv(65536)
            sock.settimeout(10)
            app.release.set()
            answer = _read_answer(sock)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + BODY)
        assert sock.recv(65536) == b""  # Connection: close was honoured after the whole answer


def test_patching_twice_changes_nothing():
    from uvicorn.protocols.http.h11_impl import RequestResponseCycle

    from mlray._ray.onewrite import write_answers_whole

    write_answers_whole()
    send = RequestResponseCycle.send
    assert len(write_answers_whole()) == 2
    assert RequestResponseCycle.send is send
