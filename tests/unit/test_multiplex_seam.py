"""mlray._ray.multiplex: the count of models a replica's LRU holds and the model made the next one out, on
the shape Ray 2.60's ``serve.multiplexed`` gives its loader (an ``OrderedDict`` of models, least recently
used first, on ``__serve_multiplex_wrapper``; Serve makes it only inside a replica, which
tests/integration/test_any_model.py runs), and a loud warning where Ray's shape differs."""

from __future__ import annotations

import logging
from collections import OrderedDict
from types import SimpleNamespace


def _loader(models: object) -> object:
    async def load(name: str) -> str:
        return name

    setattr(load, "__serve_multiplex_wrapper", SimpleNamespace(models=models))
    return load


def test_held_counts_the_lru_and_evict_first_puts_a_model_at_its_front():
    from mlray._ray import multiplex

    async def fresh(name: str) -> str:
        return name

    assert multiplex.held(fresh) == 0  # before the first load Serve has made no LRU
    lru = OrderedDict((name, object()) for name in ("a", "b", "c"))
    load = _loader(lru)
    assert multiplex.held(load) == 3
    multiplex.evict_first(load, "c")
    multiplex.evict_first(load, "nope")  # not held: nothing happens
    assert list(lru) == ["c", "a", "b"]
    lru.popitem(last=False)  # what Serve's unload_model_lru does
    assert list(lru) == ["a", "b"]


def test_a_different_lru_in_ray_is_said_once_not_acted_on(caplog):
    from mlray._ray import multiplex

    multiplex._warned.clear()
    load = _loader(["a", "b"])  # not an OrderedDict
    with caplog.at_level(logging.WARNING, logger="mlray._ray.multiplex"):
        assert multiplex.held(load) == 0
        multiplex.evict_first(load, "a")
    assert len(caplog.records) == 1 and "mlray/_ray/multiplex.py" in caplog.text
