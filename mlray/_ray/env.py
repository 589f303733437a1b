"""Every Ray environment knob mlray sets (written for Ray 2.60.0; a user's own value always wins).

Ray reads them when its processes start, so they go on ``ray start``, ``ray.init`` and the processes those
start. The figures behind each value: bench/README.md, "Why mlray's settings are what they are".
"""

from __future__ import annotations

import os

# Ray Train: set on every Ray process mlray starts, and in its drivers (Train v2 hands the driver's
# RAY_TRAIN_* settings on to its controller).
TRAIN_ENV = {
    # Ray Train v2 paces report() by this interval (2 s by default); shorter makes short fits much faster.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # Without this, every worker print shows up twice in the driver's output.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Train waits 60 s for a worker group to start, then retries with a new placement group while
    # the old one is still reserved; on a loaded 2-core machine (a Tune trial starting its workers) the
    # retry then waited forever for CPUs. Wait longer for the first group instead.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
}

# Only on a cluster mlray starts on this machine (`ray start --head` for the quickstart / `mlray serve`, or the
# throwaway in-process one), never on one `ray up` launches: Ray Train's preemption watcher is an actor per
# worker group that polls for nodes being drained (spot reclaim), and a single machine has none to drain. Its
# start is ~3.4 s of each training's ~22 s fixed cost on a 2-core machine (bench/README.md).
LOCAL_HEAD_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

# Ray Serve on a head mlray starts: HAProxy ingress and throughput mode (what they turn off: README,
# "Serving speed"). MLRAY_SERVE_HA_PROXY=0 keeps Serve's defaults.
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # 30 s by default: every `serve shutdown`, redeploy and scale-down waited that long; 5 s still replaces
    # every replica under load without a failed request.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    # Throughput mode buffers 1,000 access-log records per replica and writes them inside whichever request
    # fills the buffer, a stall in that request's answer; 100 records make each flush short. Same log lines.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "100",
    # Not RAY_SERVE_HAPROXY_CLOSE_SPREAD_TIME_S: a reloaded-out worker would close idle keep-alive connections
    # within that window, and a client sending on one at that instant gets a reset.
    # Replay a request whose replica died before answering on another replica, as well as one that could not
    # connect (Ray's default). mlray's routes are predictions and reads, safe to replay; set
    # RAY_SERVE_HAPROXY_RETRY_ON=conn-failure when starting the head if it serves requests that must not run twice.
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    # 3 by default. A request whose HAProxy process knows only the replica that died (one reloaded out before
    # the replacement joined) retries on it until the replica is marked down, then reaches the head's fallback
    # proxy; 3 and even 5 retries were seen to run out first (figures: bench/README.md, "Why mlray's settings
    # are what they are"). Only a request that itself kills replicas is replayed more often for it.
    "RAY_SERVE_HAPROXY_RETRIES": "10",
}

# Per-head HAProxy settings (free ports, a private folder for its files, the wrapper): see haproxy.haproxy_env.
HAPROXY_FILE_KNOBS = (
    "RAY_SERVE_HAPROXY_BINARY_PATH", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC",
    "RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH",
)

FALSY = ("0", "false", "no")


def _users_first(knobs: dict[str, str]) -> dict[str, str]:
    return {key: os.environ.get(key, value) for key, value in knobs.items()}


def train_env() -> dict[str, str]:
    """:data:`TRAIN_ENV`, with the user's own values where set."""
    return _users_first(TRAIN_ENV)


def local_head_env() -> dict[str, str]:
    """:data:`LOCAL_HEAD_ENV`, with the user's own values where set."""
    return _users_first(LOCAL_HEAD_ENV)


def serve_env() -> dict[str, str]:
    """:data:`SERVE_ENV`, with the user's own values where set."""
    return _users_first(SERVE_ENV)


def haproxy_metrics_enabled() -> bool:
    value = os.environ.get("RAY_SERVE_HAPROXY_METRICS_ENABLED", SERVE_ENV["RAY_SERVE_HAPROXY_METRICS_ENABLED"])
    return value.strip().lower() not in FALSY
