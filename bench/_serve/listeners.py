"""Which TCP sockets a process tree listens on, and on which address: the security audit of a Serve mode.

The same inventory ``ss -ltnp`` gives, limited to the processes this benchmark started (so other Ray
clusters on the machine do not show up), and labelled by role.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

LOOPBACK = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Listener:
    role: str
    address: str
    port: int
    pid: int

    @property
    def loopback_only(self) -> bool:
        return self.address in LOOPBACK


def role_of(proc: psutil.Process) -> str:
    try:
        cmdline, name = proc.cmdline(), proc.name()
    except psutil.Error:
        return "?"
    head = cmdline[0] if cmdline else name
    if os.path.basename(head) == "haproxy" or name == "haproxy":
        return "haproxy"
    if head.startswith("ray::"):
        # ray::ServeReplica:digits:ModelServer, ray::ServeController, ray::ProxyActor, ray::HAProxyManager, ray::IDLE
        actor = head.split()[0].removeprefix("ray::").split(".")[0]  # "ServeController.listen_for_change"
        return f"serve: {actor}" if actor.startswith(("Serve", "Proxy", "HAProxy")) else f"ray worker: {actor}"
    joined = " ".join(cmdline)
    for marker, label in (("gcs_server", "ray core: gcs_server"), ("raylet", "ray core: raylet"),
                          ("dashboard/agent.py", "ray core: dashboard agent"),
                          ("runtime_env/agent", "ray core: runtime env agent"),
                          ("log_monitor.py", "ray core: log monitor"),
                          ("autoscaler/_private/monitor.py", "ray core: autoscaler monitor"),
                          ("dashboard/dashboard.py", "ray core: dashboard"),
                          ("default_worker.py", "ray worker")):
        if marker in joined:
            return label
    return name


def listeners(root_pid: int | None = None) -> list[Listener]:
    """Every listening TCP socket of ``root_pid`` (default: this process) and its descendants."""
    root = psutil.Process(root_pid or os.getpid())
    found: list[Listener] = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        role = "driver (this process)" if proc.pid == root.pid else role_of(proc)
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                found.append(Listener(role=role, address=conn.laddr.ip, port=conn.laddr.port, pid=proc.pid))
    return sorted(found, key=lambda item: (item.role, item.address, item.port))


def summarize(found: list[Listener]) -> list[dict]:
    """One row per (role, address): the ports, so a table stays short when replicas open many."""
    rows: dict[tuple[str, str], list[int]] = {}
    for item in found:
        rows.setdefault((item.role, item.address), []).append(item.port)
    return [{"role": role, "address": address, "ports": sorted(set(ports))}
            for (role, address), ports in sorted(rows.items())]
