"""JSON Schemas of mlray's two config files, generated from the pydantic models that validate them."""

from __future__ import annotations

from typing import Any

from mlray.errors import ConfigError

KINDS = ("job", "serve")


def config_schema(kind: str) -> dict[str, Any]:
    """``job``: a job config (configs/*.yaml, :class:`mlray.config.JobConfig`); ``serve``: a Serve app's
    ``args`` (:class:`mlray.serving.config.ServeAppConfig`)."""
    if kind == "job":
        from mlray.config import JobConfig

        schema = JobConfig.model_json_schema()
        title = "mlray job config"
    elif kind == "serve":
        from mlray.serving.config import ServeAppConfig

        schema = ServeAppConfig.model_json_schema()
        title = "mlray Serve app args"
    else:
        raise ConfigError(f"no config schema named {kind!r}; choose one of {', '.join(KINDS)}")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": title}
