"""A many-models app's ``models:`` entries that select by registry tag or name pattern, made explicit.

An entry ``{tag: team=fraud}`` or ``{pattern: "fraud-*"}`` stands for every registered model it matches that
has the entry's alias. The selection is made once, when the app is deployed (:func:`expand`), and the app's
replicas get the list of names: every replica serves the same models, also one that autoscaling adds later.
A model tagged or registered after the deploy is served from the next ``serve deploy`` (or ``mlray serve``).
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

from mlray.errors import ConfigError
from mlray.serving.config import ModelEntry, ServeAppConfig

logger = logging.getLogger(__name__)


def _matches(entry: ModelEntry, model: Any) -> bool:
    if entry.pattern is not None:
        return fnmatch.fnmatchcase(model.name, entry.pattern)
    assert entry.tag is not None
    key, has_value, value = entry.tag.partition("=")
    tags = model.tags or {}
    return key in tags and (not has_value or tags[key] == value)


def _all_registered(mlflow_client: Any) -> list[Any]:
    found, token = [], None
    while True:
        page = mlflow_client.search_registered_models(max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _label(entry: ModelEntry) -> str:
    return f"tag {entry.tag!r}" if entry.tag is not None else f"pattern {entry.pattern!r}"


def expand(cfg: ServeAppConfig) -> ServeAppConfig:
    """``cfg`` with every tag or pattern entry replaced by the models it selects (named entries win over a
    selection that also matches them). Raises :class:`ConfigError` for a selector that matches no model with
    its alias, so a deploy fails with the entry's name rather than serving nothing."""
    if not any(entry.selects for entry in cfg.models):
        return cfg
    from mlray.registry.tracking import client

    registered = _all_registered(client(cfg.tracking_uri))
    named = {entry.name for entry in cfg.models if entry.name is not None}
    entries: list[ModelEntry] = []
    for entry in cfg.models:
        if not entry.selects:
            entries.append(entry)
            continue
        matched = sorted((m for m in registered if _matches(entry, m)), key=lambda m: m.name)
        with_alias = [m for m in matched if entry.alias in (m.aliases or {})]
        for model in matched:
            if model not in with_alias:
                logger.warning("models: %s matches %s, which has no @%s; not served", _label(entry), model.name,
                               entry.alias)
        if not with_alias:
            raise ConfigError(f"models: {_label(entry)} selects no registered model with alias @{entry.alias} "
                              f"(it matches {[m.name for m in matched][:10] or 'no model'} of {len(registered)}); "
                              "register or tag one, or give the alias its models have")
        for model in with_alias:
            if model.name not in named:
                named.add(model.name)
                entries.append(ModelEntry(name=model.name, alias=entry.alias, challenger=entry.challenger))
    return cfg.model_copy(update={"models": entries})
