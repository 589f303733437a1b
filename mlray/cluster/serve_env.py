"""The Ray Serve settings of a head that mlray starts (``mlray quickstart``, ``mlray serve``).

HAProxy ingress and throughput mode (:data:`mlray._ray.env.SERVE_ENV`; what they turn off: README, "Serving
speed"), per-head HAProxy ports and files, and the wrapper that rewrites Ray's HAProxy config
(:mod:`mlray._ray.haproxy`). Serve reads them when its processes start, so they are set on ``ray start``.
``MLRAY_SERVE_HA_PROXY=0`` keeps Serve's defaults. Measurements: bench/README.md.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mlray._ray.agent import is_metrics_agent, lower_metrics_agent_priority
from mlray._ray.env import SERVE_ENV, serve_env
from mlray._ray.haproxy import drops_access_log, haproxy_env, verify_against_ray

FAST_SERVE_ENV = SERVE_ENV  # the name this module exported before mlray/_ray/

__all__ = ["FAST_SERVE_ENV", "drops_access_log", "haproxy_env", "is_metrics_agent", "lower_metrics_agent_priority",
           "serve_head_env", "main"]


def serve_head_env(home: Path, *, verify: bool = True) -> dict[str, str]:
    """The Serve environment for a head whose state lives in ``home`` (empty when switched off).

    ``verify`` renders Ray's own HAProxy template once and warns about any rewrite that no longer applies.
    """
    if os.environ.get("MLRAY_SERVE_HA_PROXY", "1") == "0":
        return {}
    rundir = Path("/tmp") / f"mlray-hap-{hashlib.sha256(str(home).encode()).hexdigest()[:10]}"
    env = {**serve_env(), **haproxy_env(rundir)}
    if verify:
        verify_against_ray()
    return env


def main() -> None:
    """``eval "$(python -m mlray.cluster.serve_env)"`` before ``ray start`` on a node of a cluster that ``ray up``
    launches (cluster.yaml): the same Serve settings as a head mlray starts itself."""
    import shlex

    from mlray import settings

    for key, value in sorted(serve_head_env(settings.home()).items()):
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
