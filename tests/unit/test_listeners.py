"""mlray.cluster.listeners: how far a bound address reaches, and which listeners break the cluster design.

tests/cluster runs the same module on a launched head; here the rules, and this machine's own sockets.
"""

from __future__ import annotations

import socket

import pytest

from mlray.cluster.listeners import LOOPBACK, PRIVATE, PUBLIC, WILDCARD, Listener, findings, listeners, main, reach_of


@pytest.mark.parametrize(
    ("address", "reach"),
    [
        ("127.0.0.1", LOOPBACK), ("::1", LOOPBACK), ("::ffff:127.0.0.1", LOOPBACK),
        ("0.0.0.0", WILDCARD), ("::", WILDCARD),
        ("10.201.0.2", PRIVATE), ("::ffff:10.201.0.2", PRIVATE), ("172.31.5.9", PRIVATE), ("fe80::1%eth0", PRIVATE),
        ("54.12.3.4", PUBLIC), ("2a05:d018::1", PUBLIC),
    ],
)
def test_reach_of_an_address(address: str, reach: str) -> None:
    assert reach_of(address) == reach


def listener(role: str, address: str, port: int) -> Listener:
    return Listener(address=address, port=port, pid=1, role=role, reach=reach_of(address))


def test_a_head_as_designed_has_no_findings() -> None:
    head = [
        listener("sshd", "0.0.0.0", 22), listener("ray-gcs", "::", 6379), listener("ray-raylet", "::", 8076),
        listener("ray-dashboard", "127.0.0.1", 8265), listener("ray-dashboard", "0.0.0.0", 44227),
        listener("ray-autoscaler", "0.0.0.0", 44217), listener("ray-dashboard-agent", "10.0.0.5", 52365),
        listener("ray-core-worker", "::", 40123), listener("ray-client-server", "10.0.0.5", 10001),
        listener("mlflow", "10.0.0.5", 5000), listener("ray-serve-proxy", "0.0.0.0", 8000),
        listener("ray-serve-haproxy", "0.0.0.0", 8000), listener("ray-serve-haproxy", "127.0.0.1", 8404),
    ]
    assert findings(head) == []


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (listener("ray-dashboard", "0.0.0.0", 8265), "only its metrics port 44227 should"),
        (listener("mlflow", "0.0.0.0", 5000), "listens on every interface"),
        (listener("ray-serve-haproxy", "0.0.0.0", 8404), "only the Serve HTTP port 8000 should"),
        (listener("ray-serve-haproxy", "0.0.0.0", 9101), "only the Serve HTTP port 8000 should"),
        (listener("postgres", "10.0.0.5", 5432), "and no postgres should"),
        (listener("ray-gcs", "54.12.3.4", 6379), "bound to a public address"),
    ],
)
def test_each_departure_from_the_design_is_a_finding_that_names_it(bad: Listener, says: str) -> None:
    found = findings([listener("sshd", "0.0.0.0", 22), bad])
    assert len(found) == 1
    assert says in found[0] and f"{bad.address}:{bad.port}" in found[0]


def test_it_finds_a_socket_this_process_listens_on(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        mine = [item for item in listeners() if item.port == port]
        assert [(item.address, item.reach, item.role) for item in mine] == [("127.0.0.1", LOOPBACK, mine[0].role)]
        main(["--json"])
    assert f'"port": {port}' in capsys.readouterr().out
