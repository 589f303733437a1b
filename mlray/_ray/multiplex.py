"""Serve's model multiplexing (``serve.multiplexed``, Ray 2.60): what a replica's LRU of models holds, and which
model it evicts next. Serve keeps the models in an ``OrderedDict`` on the wrapper it attaches to the loader
(``__serve_multiplex_wrapper``), least recently used first, and evicts the first one."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from mlray._ray import WRITTEN_FOR, installed_ray_version

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _models(loader: Callable[..., Any]) -> OrderedDict[str, Any] | None:
    wrapper = getattr(loader, "__serve_multiplex_wrapper", None)
    if wrapper is None:
        return None  # Serve makes it at the first load
    models = getattr(wrapper, "models", None)
    if isinstance(models, OrderedDict):
        return models
    if "models" not in _warned:
        _warned.add("models")
        logger.warning("Serve's multiplexing keeps its models elsewhere in Ray %s (mlray was written for Ray %s): "
                       "x-models-loaded reads 0 and model affinity cannot choose what is evicted first "
                       "(mlray/_ray/multiplex.py)", installed_ray_version(), WRITTEN_FOR)
    return None


def held(loader: Callable[..., Any]) -> int:
    """How many models the replica's LRU holds now (0 before the first load)."""
    models = _models(loader)
    return len(models) if models is not None else 0


def evict_first(loader: Callable[..., Any], name: str) -> None:
    """Make ``name`` the next model evicted (the front of Serve's LRU), if it is held."""
    models = _models(loader)
    if models is not None and name in models:
        models.move_to_end(name, last=False)
