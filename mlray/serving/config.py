"""The Serve application's settings: the ``args`` of an app in a Serve YAML, or ``mlray serve`` flags.

Pydantic, because these values come from a user's YAML: an unknown or bad field fails the deploy with
the field's name instead of failing every replica.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlray.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Section):
    enabled: bool = True
    max_batch_size: int = Field(default=32, ge=1)
    # 0 by default: on a 2-core machine, making single-row requests wait for company cut throughput;
    # requests that arrive together are still batched.
    batch_wait_timeout_s: float = Field(default=0.0, ge=0)


class FollowConfig(_Section):
    """Following the registry: when the alias moves, every replica loads, warms up, then swaps."""

    enabled: bool = True
    poll_interval_s: float = Field(default=10.0, gt=0, description="how often the registry is asked")
    sync_interval_s: float = Field(default=1.0, gt=0, description="how often a replica asks the watcher")
    warmup_rows: int = Field(default=8, ge=1)
    retry_failed_after_s: float = Field(default=60.0, ge=0, description="wait before retrying a failed version")


class ChallengerConfig(_Section):
    """A second version in the same app: a weighted split, or a shadow that never answers clients."""

    alias: str = "challenger"
    mode: Literal["split", "shadow"] = "split"
    weight: float = Field(default=0.1, ge=0, le=1, description="share of requests the challenger answers (split)")
    sticky_header: str = Field(default="x-mlray-key", description="requests with the same value go to the same side")
    shadow_records: int = Field(default=1000, ge=1, description="shadow comparisons kept by the watcher")


class AdmissionConfig(_Section):
    """Backpressure inside each replica: beyond ongoing + queued, answer 503 with Retry-After at once."""

    max_ongoing_requests: int = Field(default=32, ge=1)
    max_queued_requests: int = Field(default=128, ge=0)
    timeout_s: float = Field(default=10.0, gt=0, description="a request not answered by then gets 504")
    retry_after_s: int = Field(default=1, ge=0)


class AuthConfig(_Section):
    """API keys on every route that is not public. Keys are never in the YAML: only where to find them."""

    enabled: bool = False
    keys_env: str | None = Field(default="MLRAY_API_KEYS", description="env var with comma-separated keys/hashes")
    keys_file: str | None = Field(default=None, description="file with one key hash (sha256:<hex>) per line")

    @model_validator(mode="after")
    def _has_source(self) -> AuthConfig:
        if self.enabled and not (self.keys_env or self.keys_file):
            raise ValueError("auth.enabled is true but neither auth.keys_env nor auth.keys_file is set")
        return self


def _split_uri(data: Any, key: str, where: str) -> Any:
    """``{key: "models:/NAME@ALIAS"}`` (or ``models:/NAME/VERSION``) -> ``{key: NAME, alias/version: ...}``, the
    URI form mlray's commands accept wherever a model is named; an alias or version also given must agree."""
    if not (isinstance(data, dict) and isinstance(data.get(key), str) and data[key].startswith("models:/")):
        return data
    from mlray.registry import parse_model_ref

    try:
        ref = parse_model_ref(data[key])
    except ConfigError as err:
        raise ValueError(f"{where}: {err}") from None
    out = {**data, key: ref.name}
    for field_name, value in (("alias", ref.alias), ("version", ref.version)):
        if value is None:
            continue
        if data.get(field_name) not in (None, value):
            raise ValueError(f"{where}: {data[key]!r} names {field_name} {value!r}, but {field_name} "
                             f"{data[field_name]!r} is also given; give one")
        other = "version" if field_name == "alias" else "alias"
        if data.get(other) is not None:
            raise ValueError(f"{where}: {data[key]!r} names {field_name} {value!r}, and {other} {data[other]!r} is "
                             f"also given; give one")
        out[field_name], out[other] = value, None  # the URI's target replaces the default alias
    return out


class ModelEntry(_Section):
    """One model of a many-models app (``models:``): a name, or every registered model a ``tag`` or a name
    ``pattern`` selects when the app is deployed (:mod:`mlray.serving.selection`); with its alias, or a fixed
    version."""

    name: str | None = Field(default=None, min_length=1, pattern=r"^[^/:]+$", description="registered model name")
    tag: str | None = Field(default=None, pattern=r"^[^=]+(=.*)?$",
                            description="every registered model with this tag: KEY=VALUE, or KEY for any value")
    pattern: str | None = Field(default=None, min_length=1,
                                description="every registered model whose name matches this glob (* and ?)")
    alias: str | None = None
    version: int | None = Field(default=None, ge=1)
    challenger: ChallengerConfig | None = Field(
        default=None, description="this model's challenger (split): a canary of one model of the app")

    @model_validator(mode="before")
    @classmethod
    def _uri(cls, data: Any) -> Any:
        return _split_uri(data, "name", "models entry")

    @model_validator(mode="after")
    def _one_target(self) -> ModelEntry:
        given = {key: value for key, value in (("name", self.name), ("tag", self.tag), ("pattern", self.pattern))
                 if value is not None}
        if len(given) != 1:
            raise ValueError(f"a models entry gives exactly one of name, tag or pattern, got {given or 'none'}")
        label = next(iter(given.values()))
        if self.alias is not None and self.version is not None:
            raise ValueError(f"models[{label!r}]: give alias ({self.alias!r}) or version ({self.version!r}), "
                             "not both")
        if self.version is not None and self.name is None:
            raise ValueError(f"models[{label!r}]: a fixed version is for one named model; a tag or a pattern "
                             "follows an alias")
        if self.alias is None and self.version is None:
            object.__setattr__(self, "alias", "champion")
        if self.challenger is not None:
            if self.challenger.mode != "split":
                raise ValueError(f"models[{label!r}].challenger.mode {self.challenger.mode!r}: a many-models app "
                                 "runs split challengers; a shadow challenger needs an app of one model (model:)")
            if self.challenger.alias == self.alias:
                raise ValueError(f"models[{label!r}].challenger.alias {self.challenger.alias!r} is the model's own "
                                 "alias; use another")
        return self

    @property
    def selects(self) -> bool:
        """Whether this entry stands for the models a tag or pattern selects, not one named model."""
        return self.name is None


class ServeAppConfig(_Section):
    model: str = Field(default="", description="registered model name (one model; or list them in models)")
    models: list[ModelEntry] = Field(default_factory=list, description="many models in one app, routed by name")
    max_models_per_replica: int = Field(default=8, ge=1, description="models a replica keeps loaded (LRU)")
    model_affinity: bool = Field(
        default=True,
        description="when the models outnumber max_models_per_replica, each replica claims up to one fewer and the "
                    "HAProxy ingress sends a claimed model's requests to its replica (false: balance every request)")
    cold_load_timeout_s: float = Field(default=30.0, gt=0, description="a request for a model no replica holds "
                                                                       "waits this long for its load, then 503")
    alias: str | None = "champion"
    version: int | None = Field(default=None, ge=1, description="a fixed version instead of an alias")
    tracking_uri: str | None = None
    max_rows: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    allow_pickle: bool = Field(
        default=False,
        description="load models whose MLflow flavour is a pickle (scikit-learn pickle/cloudpickle, a cloudpickled "
                    "PythonModel): unpickling runs the file's code, so this trusts everyone who can write to the "
                    "registry and its artifact store (docs/any-model.md)")
    fast_path: bool = Field(default=True, description="answer the prediction routes ahead of FastAPI's router "
                                                      "(same handlers and errors, less CPU per request)")
    access_log: bool = Field(default=False, description="a line per request in each replica's Serve log "
                                                        "(logs/serve/replica_*.log); off by default: mlray's "
                                                        "request metrics count every answer, and the line costs "
                                                        "CPU on every request (bench/README.md)")
    lean_ingress: bool = Field(default=True, description="prediction requests skip the parts of Serve's per-request "
                                                          "wrapper they do not use (mlray/_ray/ingress.py), for less "
                                                          "CPU per request (bench/README.md); off, or while Serve's "
                                                          "access log is on, every request takes Serve's own "
                                                          "wrapper")
    batching: BatchingConfig = BatchingConfig()
    follow: FollowConfig = FollowConfig()
    challenger: ChallengerConfig | None = None
    admission: AdmissionConfig = AdmissionConfig()
    auth: AuthConfig = AuthConfig()
    metrics_agent_nice: int | None = Field(
        default=None, ge=0, le=19,
        description="opt-in: nice level each replica gives the Ray metrics agent of its own node (its 1-s bursts "
                    "every 10 s otherwise take a core from the replicas; serve_apps/digits.yaml sets 19); "
                    "null (the default) leaves it at Ray's 0")

    @model_validator(mode="before")
    @classmethod
    def _uri(cls, data: Any) -> Any:
        return _split_uri(data, "model", "model")

    @model_validator(mode="after")
    def _one_target(self) -> ServeAppConfig:
        if bool(self.model) == bool(self.models):
            raise ValueError(f"give exactly one of model ({self.model!r}) or models ({len(self.models)} listed)")
        if self.models:
            names = [entry.name for entry in self.models if entry.name is not None]
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"models lists {repeated[0]!r} more than once; each model once")
            if self.challenger is not None:
                raise ValueError("challenger: in a many-models app each model has its own; put it under the model's "
                                 "entry (models: [{name: NAME, challenger: {alias: challenger, weight: 0.1}}])")
            return self
        if (self.alias is None) == (self.version is None):
            raise ValueError(f"give exactly one of alias ({self.alias!r}) or version ({self.version!r})")
        if self.challenger is not None and self.challenger.alias == self.alias:
            raise ValueError(f"challenger.alias {self.challenger.alias!r} is the champion's alias; use another")
        return self

    @property
    def entries(self) -> list[ModelEntry]:
        """Every model the app serves: ``models``, or ``model`` as a list of one."""
        return self.models or [ModelEntry(name=self.model, alias=self.alias, version=self.version)]

    def for_model(self, entry: ModelEntry) -> ServeAppConfig:
        """The settings of one model of the app: the same app settings, that model's name and target."""
        challenger = entry.challenger if self.models else self.challenger  # one model: the app's own section
        return self.model_copy(update={"model": entry.name, "alias": entry.alias, "version": entry.version,
                                       "models": [], "challenger": challenger})

    @property
    def target(self) -> str:
        return f"models:/{self.model}@{self.alias}" if self.alias else f"models:/{self.model}/{self.version}"
