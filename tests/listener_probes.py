"""How a listener answers a caller that holds no credentials: shared by the launched cluster's audit
(tests/cluster) and the quickstart head's (tests/docs).

Each port is called as an outsider would: over HTTP first (401 is a refusal; a Prometheus page is open and
read-only), else over gRPC with a real method of a service its role serves and no token (UNAUTHENTICATED is
a refusal). Anything else is an answer.
"""

from __future__ import annotations

import subprocess

import grpc
import requests

CORE_WORKER = "/ray.rpc.CoreWorkerService/GetCoreWorkerStats"
# A Serve replica's own gRPC server (bound to [::]:0 by Ray, no setting): requests from Serve's proxies.
SERVE_REPLICA = "/ray.serve.ASGIService/HandleRequestWithRejectionStreaming"
GRPC_METHODS = {  # a real method of each gRPC service a role serves, called without a token
    "ray-gcs": ["/ray.rpc.NodeInfoGcsService/GetAllNodeInfo"],
    "ray-raylet": ["/ray.rpc.NodeManagerService/GetNodeStats", "/ray.rpc.ObjectManagerService/Pull"],
    "ray-dashboard-agent": ["/ray.rpc.ReporterService/HealthCheck", CORE_WORKER],
    "ray-client-server": ["/ray.rpc.RayletDriver/ClusterInfo"],
    "ray-core-worker": [CORE_WORKER, SERVE_REPLICA],
    "ray-serve-proxy": [CORE_WORKER],
}
OPEN_READ_ONLY = "metrics: open, read-only"


def grpc_refusal(address: str, port: int, methods: list[str]) -> str | None:
    """The UNAUTHENTICATED detail of the first of ``methods`` the port serves, called without a token."""
    with grpc.insecure_channel(f"{address}:{port}") as channel:
        for method in methods:
            call = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
            try:
                call(b"", timeout=10)
                return None
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return str(err.details())
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return None
    return None


def http_answer(address: str, port: int, path: str = "/") -> tuple[int, str] | None:
    host = f"[{address}]" if ":" in address else address
    try:
        response = requests.get(f"http://{host}:{port}{path}", timeout=10)
    except requests.RequestException:
        return None  # not HTTP/1.1 (a gRPC port)
    return response.status_code, response.text[:200]


def how_it_refuses(role: str, address: str, port: int) -> str:
    """How a listener answers a caller from outside the node that holds no credentials: "http: 401",
    "grpc: UNAUTHENTICATED (...)", "ssh: publickey only", :data:`OPEN_READ_ONLY`, or "ANSWERED: ..."."""
    if role == "sshd":
        done = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no", "-o",
                               "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-p", str(port),
                               f"root@{address}", "true"], capture_output=True, text=True, timeout=30)
        return "ssh: publickey only" if "Permission denied (publickey)" in done.stderr else done.stderr
    answer = http_answer(address, port)
    if answer is not None:
        if answer[0] == 401:
            return "http: 401"
        metrics = http_answer(address, port, "/metrics")
        if metrics and metrics[0] == 200 and metrics[1].startswith("# HELP"):
            return OPEN_READ_ONLY
        return f"ANSWERED: {answer}"
    # Any Ray process that joined the cluster as a driver (the dashboard's head process does) also serves a
    # core worker's gRPC service on a port of its own.
    methods = list(dict.fromkeys([*GRPC_METHODS.get(role, []), CORE_WORKER]))
    refusal = grpc_refusal(address, port, methods)
    return f"grpc: UNAUTHENTICATED ({refusal})" if refusal else "ANSWERED: gRPC without a token"
