"""Everything mlray does to Ray beyond its public API, in one place.

Public modules of mlray use Ray's public API and this package only. Each item here names the Ray version it
was written for (:data:`WRITTEN_FOR`) and says so loudly - a ``logging.warning``, never a silent no-op - when
the installed Ray differs or when the item finds nothing to act on:

- :mod:`mlray._ray.env`: every ``RAY_TRAIN_*`` / ``RAY_SERVE_*`` environment knob mlray sets.
- :mod:`mlray._ray.haproxy`: the wrapper around Serve's HAProxy binary and its rewrite rules for the
  config Ray renders (loopback binds, the prediction routes' header, no per-request log line, a stick
  table per app for model affinity).
- :mod:`mlray._ray.auth`: token auth for the local head (mlray's token, mode 0600), the venv hook through
  which Ray's CLIs find it, and re-reading Ray's config in a process that imported Ray first.
- :mod:`mlray._ray.agent`: lowering the priority of this node's Ray metrics agent (opt-in).
- :mod:`mlray._ray.multiplex`: what a replica's LRU of models (``serve.multiplexed``) holds, and which one
  it evicts next (model affinity makes an unclaimed model the first out).
- :mod:`mlray._ray.ingress`: a lean wrapper in front of Serve's per-request direct-ingress wrapper for the
  prediction routes (Serve's own admission, ongoing-request slot and request metrics, no access-log record).
- :mod:`mlray._ray.onewrite`: a replica's uvicorn (Serve's direct ingress) sends each answer's head and
  body in one write, so a replica killed mid-answer sends nothing HAProxy cannot replay.

``tests/unit/test_ray_seam.py`` fails on any private Ray import or underscore attribute of a Ray object
outside this package, and renders Ray's real HAProxy template to check every rewrite rule still applies.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)

WRITTEN_FOR = "2.60.0"


@functools.cache
def installed_ray_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def check_version(what: str) -> bool:
    """Whether the installed Ray is the one ``what`` was written for; warns once per ``what`` if not."""
    found = installed_ray_version()
    if found == WRITTEN_FOR:
        return True
    logger.warning("mlray's %s was written for Ray %s and Ray %s is installed: check that it still applies "
                   "(mlray/_ray/)", what, WRITTEN_FOR, found)
    return False
