"""What a node listens on: each listening TCP socket, the role of the process that owns it, how far it reaches.

Run it on a node to audit what the node exposes; it exits 1 if something is exposed that mlray's cluster
design does not expect:

    ray exec cluster.yaml '~/mlray-env/bin/python -m mlray.cluster.listeners'

tests/cluster runs it on a launched local cluster. Roles come from the owning process's command line (or a
parent's: uvicorn's workers share their parent's socket). Reach is judged from the bound address: a
wildcard (0.0.0.0, ::) reaches every interface of the node, so it is as open as the node's most public
address, and on a cloud node only the firewall (the security group) keeps it inside the cluster.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from dataclasses import asdict, dataclass

LOOPBACK, PRIVATE, WILDCARD, PUBLIC = "loopback", "private", "wildcard", "public"

# (mark in a command line, role). First match wins, so the specific marks come first.
ROLE_MARKS: tuple[tuple[str, str], ...] = (
    ("gcs_server", "ray-gcs"),
    ("raylet/raylet", "ray-raylet"),
    ("ray::DashboardAgent", "ray-dashboard-agent"),
    ("ray::RuntimeEnvAgent", "ray-runtime-env-agent"),
    ("ray::ProxyActor", "ray-serve-proxy"),
    ("haproxy", "ray-serve-haproxy"),
    ("ray/dashboard/dashboard.py", "ray-dashboard"),
    ("autoscaler/_private/monitor.py", "ray-autoscaler"),
    ("autoscaler/v2/monitor.py", "ray-autoscaler"),
    ("ray.util.client.server", "ray-client-server"),
    ("mlflow", "mlflow"),
    ("sshd", "sshd"),
)

# Roles that listen beyond loopback by design, and what guards them. Any other role that does is a finding.
EXPOSED_BY_DESIGN: dict[str, str] = {
    "sshd": "SSH, keys only: how `ray up`, `ray exec` and the tunnels reach the node",
    "ray-gcs": "GCS (6379), gRPC: Ray token auth",
    "ray-raylet": "node manager and object manager (8076), gRPC: Ray token auth",
    "ray-dashboard-agent": "agent gRPC, HTTP (52365) and, once it ran a job, a worker port: Ray token auth; "
                           "its Prometheus metrics port: open, read-only",
    "ray-runtime-env-agent": "runtime-env agent, HTTP: Ray token auth",
    "ray-client-server": "Ray Client (10001), gRPC: Ray token auth",
    "ray-core-worker": "each Ray worker process and job driver, gRPC: Ray token auth",
    "ray-dashboard": "its Prometheus metrics (44227), open and read-only; the dashboard itself is on 127.0.0.1",
    "ray-autoscaler": "its Prometheus metrics (44217), open and read-only",
    "mlflow": "MLflow tracking server: basic auth, on the node's address for the other nodes",
    "ray-serve-proxy": "Serve's HTTP port (8000), the one port for clients: API keys on every prediction "
                       "route (serve_apps/digits.cluster.yaml); and its worker port, gRPC: Ray token auth",
    "ray-serve-haproxy": "Serve's HAProxy ingress on the Serve HTTP port (8000) only; never its stats or "
                         "metrics ports",
}

# HTTP servers mlray starts and binds itself: never on a wildcard, never beyond loopback unless listed.
DASHBOARD_PORT = 8265
SERVE_PORT = 8000
RAY_METRICS_PORTS = {"ray-dashboard": 44227, "ray-autoscaler": 44217}


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    pid: int | None
    role: str
    reach: str

    @property
    def exposed(self) -> bool:
        return self.reach != LOOPBACK


def reach_of(address: str) -> str:
    """How far a socket bound to ``address`` reaches: loopback, private, wildcard or public."""
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone ("fe80::1%eth0") is not part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return WILDCARD
    if ip.is_loopback:
        return LOOPBACK
    if ip.is_private or ip.is_link_local:
        return PRIVATE
    return PUBLIC


def _role_in(cmdline: str) -> str | None:
    for mark, role in ROLE_MARKS:
        if mark in cmdline:
            return role
    # Ray names its worker processes "ray::<what runs there>": an idle worker, an actor, a job's supervisor.
    return "ray-core-worker" if cmdline.startswith("ray::") else None


def role_of(pid: int | None) -> str:
    """The role of the process ``pid``, or of its parent or grandparent (a job driver, a uvicorn worker)."""
    import psutil

    if pid is None:
        return "unknown"
    try:
        process: psutil.Process | None = psutil.Process(pid)
        name = process.name() if process else "unknown"
        for _ in range(3):
            if process is None:
                break
            role = _role_in(" ".join(process.cmdline()) or process.name())
            if role:
                return role
            process = process.parent()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "unknown"
    return name


def listeners() -> list[Listener]:
    """Every listening TCP socket of this node (this network namespace), once each, by port."""
    import psutil

    by_socket: dict[tuple[str, int], int | None] = {}
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr:
            continue
        key = (conn.laddr.ip, conn.laddr.port)
        # Processes that share a socket (uvicorn's workers) all report it: keep the parent, the lowest pid.
        known = by_socket.get(key)
        by_socket[key] = conn.pid if known is None or (conn.pid is not None and conn.pid < known) else known
    found = [Listener(address=ip, port=port, pid=pid, role=role_of(pid), reach=reach_of(ip))
             for (ip, port), pid in by_socket.items()]
    return sorted(found, key=lambda item: (item.port, item.address))


def findings(found: list[Listener]) -> list[str]:
    """What is exposed against mlray's design, one sentence each; empty when the node is as designed."""
    problems = []
    for item in found:
        where = f"{item.role} (pid {item.pid}) on {item.address}:{item.port}"
        if not item.exposed:
            continue
        if item.reach == PUBLIC:
            problems.append(f"{where} is bound to a public address; bind 127.0.0.1 or the node's private address")
        elif item.role not in EXPOSED_BY_DESIGN:
            problems.append(f"{where} listens beyond loopback, and no {item.role} should; bind it to 127.0.0.1")
        elif item.role == "mlflow" and item.reach == WILDCARD:
            problems.append(f"{where} listens on every interface; bind it to the node's private address")
        elif item.role == "ray-serve-haproxy" and item.port != SERVE_PORT:
            problems.append(f"{where} listens beyond loopback; only the Serve HTTP port {SERVE_PORT} should "
                            "(HAProxy's stats and metrics bind every interface: keep them behind the firewall)")
        elif item.role in RAY_METRICS_PORTS and item.port != RAY_METRICS_PORTS[item.role]:
            problems.append(f"{where} listens beyond loopback; only its metrics port "
                            f"{RAY_METRICS_PORTS[item.role]} should (the dashboard belongs on 127.0.0.1:"
                            f"{DASHBOARD_PORT})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlray.cluster.listeners", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per listener, then the findings")
    args = parser.parse_args(argv)
    found = listeners()
    problems = findings(found)
    if args.json:
        for item in found:
            print(json.dumps(asdict(item)))
        print(json.dumps({"findings": problems}))
    else:
        for item in found:
            why = EXPOSED_BY_DESIGN.get(item.role, "") if item.exposed else ""
            print(f"{item.address:>22}:{item.port:<6} {item.reach:<9} {item.role:<22} {why}")
        for problem in problems:
            print(f"FINDING: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
