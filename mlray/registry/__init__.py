"""The model registry: versions, aliases, and the promotion gate.

Training registers versions here; serving resolves ``NAME@ALIAS`` here. They never import each other.
The package is mlray's MLflow side: this module is the registry, :mod:`mlray.registry.tracking` the runs
(creation, per-epoch metrics, the logged model, lineage tags).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from mlray.config import GateConfig
from mlray.errors import ConfigError, MlrayError, NotFound, PromotionRefused
from mlray.registry.tracking import client

logger = logging.getLogger(__name__)

GATE_TAG_PREFIX = "mlray.gate."
PROMOTION_TAG_PREFIX = "mlray.promotion."
# A registered model's tag: the share of requests its challenger answers, set by a canary at run time and
# read by the serving app's watcher (it wins over the app's static challenger.weight).
CHALLENGER_WEIGHT_TAG = "mlray.challenger_weight"
# A version's tags that say where it came from (training writes the first six, a pipeline the rest).
LINEAGE_TAGS = ("mlray.run_id", "data.name", "data.fingerprint", "git.commit", "mlray.version", "ray.job_id",
                "mlray.pipeline.id", "mlray.pipeline.run_id", "mlray.compressed_from")


def lineage_of(info: VersionInfo) -> dict[str, str]:
    """The lineage tags a version has (see :data:`LINEAGE_TAGS`)."""
    return {key: info.tags[key] for key in LINEAGE_TAGS if key in info.tags}


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    run_id: str
    source: str
    aliases: list[str]
    tags: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id, "aliases": self.aliases,
                "metrics": self.metrics, "tags": self.tags}


@dataclass(frozen=True)
class PromotionResult:
    name: str
    alias: str
    version: int
    previous_version: int | None
    forced: bool
    reason: str


def _info(mv: Any, *, with_metrics: bool = True, tracking_uri: str | None = None) -> VersionInfo:
    metrics: dict[str, float] = {}
    if with_metrics and mv.run_id:
        try:
            metrics = dict(client(tracking_uri).get_run(mv.run_id).data.metrics)
        except Exception:  # noqa: BLE001 - a version whose run was deleted still lists
            metrics = {}
    return VersionInfo(name=mv.name, version=int(mv.version), run_id=mv.run_id or "", source=mv.source,
                       aliases=list(getattr(mv, "aliases", []) or []), tags=dict(mv.tags or {}), metrics=metrics)


@dataclass(frozen=True)
class ModelRef:
    """A model named on the command line: ``NAME``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""

    name: str
    alias: str | None = None
    version: int | None = None

    @property
    def uri(self) -> str:
        if self.alias:
            return f"models:/{self.name}@{self.alias}"
        return f"models:/{self.name}/{self.version}" if self.version is not None else self.name


_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))?/?")
_MODEL_NAME = re.compile(r"[^/@:\s]+")


def parse_model_ref(text: str) -> ModelRef:
    """``digits`` / ``models:/digits@champion`` / ``models:/digits/3``; :class:`ConfigError` otherwise."""
    if text.startswith("models:/"):
        found = _MODEL_URI.fullmatch(text)
        if found:
            version = found.group("version")
            return ModelRef(found.group("name"), found.group("alias"), int(version) if version else None)
    elif _MODEL_NAME.fullmatch(text):
        return ModelRef(text)
    raise ConfigError(f"model {text!r} is not a model name, models:/NAME@ALIAS or models:/NAME/VERSION")


def register(name: str, *, model_uri: str, run_id: str, tags: dict[str, str],
             tracking_uri: str | None = None) -> VersionInfo:
    """Register a new version with its tags, all or nothing: a failure deletes the half-made version."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    # A logged model's URI (models:/m-<id>) names the model: an MLflow server refuses the version unless
    # model_id says which one, since the source is not under the run's artifacts.
    logged = re.fullmatch(r"models:/(m-[0-9a-f]+)", model_uri)
    version = mlflow_client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags,
                                                 model_id=logged.group(1) if logged else None)
    try:
        for _ in range(600):  # local stores are READY at once; remote ones may take a moment
            if version.status == "READY":
                break
            time.sleep(0.1)
            version = mlflow_client.get_model_version(name, version.version)
        if version.status != "READY":
            raise MlrayError(f"model version {name}/{version.version} is {version.status}, not READY")
    except BaseException:
        mlflow_client.delete_model_version(name, version.version)
        raise
    logger.info("Registered %s version %s from run %s", name, version.version, run_id)
    return _info(version, with_metrics=False, tracking_uri=tracking_uri)


def get_version(name: str, *, version: int | None = None, alias: str | None = None,
                tracking_uri: str | None = None) -> VersionInfo:
    """One version, by number or by alias; :class:`NotFound` names what is missing."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    try:
        if alias is not None:
            mv = mlflow_client.get_model_version_by_alias(name, alias)
        elif version is not None:
            mv = mlflow_client.get_model_version(name, str(version))
        else:
            raise ValueError("give a version or an alias")
    except MlflowException as err:
        what = f"alias @{alias}" if alias is not None else f"version {version}"
        raise NotFound(f"registered model {name!r} has no {what}") from err
    return _info(mv, tracking_uri=tracking_uri)


def list_models(*, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every registered model with its versions (newest first) and aliases."""
    mlflow_client = client(tracking_uri)
    out = []
    for model in mlflow_client.search_registered_models():
        versions = mlflow_client.search_model_versions(f"name='{model.name}'")
        infos = sorted((_info(v, tracking_uri=tracking_uri) for v in versions), key=lambda v: -v.version)
        out.append({"name": model.name, "aliases": dict(model.aliases or {}),
                    "versions": [v.to_dict() for v in infos]})
    return out


def challenger_weight(name: str, *, tracking_uri: str | None = None) -> float | None:
    """The registry's challenger weight for ``name`` (:data:`CHALLENGER_WEIGHT_TAG`), or None when unset."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client(tracking_uri).get_registered_model(name).tags or {}
    except MlflowException:
        return None
    raw = tags.get(CHALLENGER_WEIGHT_TAG)
    try:
        return min(1.0, max(0.0, float(raw))) if raw not in (None, "") else None
    except ValueError:
        logger.warning("Ignoring %s=%r on %s: not a number", CHALLENGER_WEIGHT_TAG, raw, name)
        return None


def set_challenger_weight(name: str, weight: float | None, *, tracking_uri: str | None = None) -> None:
    """Set (or, with None, remove) the challenger's share of requests; apps follow at their next poll."""
    mlflow_client = client(tracking_uri)
    if weight is None:
        try:
            mlflow_client.delete_registered_model_tag(name, CHALLENGER_WEIGHT_TAG)
        except Exception:  # noqa: BLE001 - already unset
            pass
        return
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"challenger weight must be within [0, 1], got {weight}")
    mlflow_client.set_registered_model_tag(name, CHALLENGER_WEIGHT_TAG, str(weight))


@dataclass(frozen=True)
class Decision:
    """What the gate decided, and why (recorded in the version's tags and logged)."""

    promote: bool
    reason: str
    forced: bool = False


class PromotionGate:
    """Whether a candidate version may take an alias from the version holding it now.

    It passes when no version holds the alias, when the current one has no value of the gate's metric, or
    when the candidate is at least ``min_improvement`` better on it in the gate's direction. ``force``
    passes a candidate that fails that comparison (a forced decision); a candidate without the metric is
    refused even then, since there is nothing to compare or record.
    """

    def __init__(self, config: GateConfig | None = None, *, force: bool = False) -> None:
        self.config = config or GateConfig()
        self.force = force

    def better(self, candidate: float, current: float) -> bool:
        gate = self.config
        if gate.direction == "maximize":
            return candidate >= current + gate.min_improvement
        return candidate <= current - gate.min_improvement

    def decide(self, candidate: VersionInfo, current: VersionInfo | None, *, alias: str = "champion") -> Decision:
        gate = self.config
        if current is None:
            return Decision(True, f"no version holds @{alias} yet")
        if gate.metric not in candidate.metrics:
            return Decision(False, f"version {candidate.version} of {candidate.name!r} has no metric "
                                   f"{gate.metric!r} to gate on")
        new, old = candidate.metrics[gate.metric], current.metrics.get(gate.metric)
        if old is None:
            return Decision(True, f"@{alias} (version {current.version}) has no {gate.metric}")
        rule = f"({gate.direction}, min improvement {gate.min_improvement})"
        if self.better(new, old):
            return Decision(True, f"{gate.metric} {new:.4f} vs {old:.4f} of version {current.version} passes the "
                                  f"gate {rule}")
        if self.force:
            return Decision(True, f"forced: {gate.metric} {new:.4f} vs {old:.4f} of version {current.version} "
                                  f"fails the gate", forced=True)
        return Decision(False, f"refused to move {candidate.name}@{alias} to version {candidate.version}: "
                               f"{gate.metric} {new:.4f} is not better than {old:.4f} of version {current.version} "
                               f"{rule}; pass --force to override")


def promote(name: str, *, version: int, alias: str = "champion", gate: GateConfig | None = None,
            force: bool = False, reason: str = "", tracking_uri: str | None = None) -> PromotionResult:
    """Move ``alias`` to ``version`` if :class:`PromotionGate` lets it take the alias from its current version.

    Refused (:class:`PromotionRefused`, alias untouched) otherwise; ``force=True`` overrides a failed
    comparison, and the override is recorded in the version's tags.
    """
    candidate = get_version(name, version=version, tracking_uri=tracking_uri)
    try:
        current: VersionInfo | None = get_version(name, alias=alias, tracking_uri=tracking_uri)
    except NotFound:
        current = None
    if current is not None and current.version == candidate.version:
        return PromotionResult(name, alias, version, current.version, force, "already there")
    verdict = PromotionGate(gate, force=force).decide(candidate, current, alias=alias)
    if not verdict.promote:
        raise PromotionRefused(verdict.reason)
    decision = verdict.reason

    mlflow_client = client(tracking_uri)
    prefix = f"{PROMOTION_TAG_PREFIX}{alias}."
    tags = {
        f"{prefix}from_version": str(current.version) if current else "",
        f"{prefix}reason": reason or decision,
        f"{prefix}gate": decision,
        f"{prefix}time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        f"{prefix}forced": str(verdict.forced).lower(),
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, str(version), key, value)
    mlflow_client.set_registered_model_alias(name, alias, str(version))
    logger.info("Moved %s@%s to version %s: %s", name, alias, version, decision)
    return PromotionResult(name, alias, version, current.version if current else None,
                           tags[f"{prefix}forced"] == "true", decision)


def rollback(name: str, *, alias: str = "champion", tracking_uri: str | None = None) -> PromotionResult:
    """Move ``alias`` back to the version that held it before the current one (recorded at promotion).

    A rollback is an operator's decision, so the gate does not stop it; it is recorded like any promotion
    (reason ``rollback from version N``).
    """
    current = get_version(name, alias=alias, tracking_uri=tracking_uri)
    previous = current.tags.get(f"{PROMOTION_TAG_PREFIX}{alias}.from_version", "")
    if not previous:
        raise NotFound(f"{name}@{alias} is version {current.version}, which records no earlier @{alias} "
                       f"to roll back to; use `mlray promote {name} --version N --force`")
    return promote(name, version=int(previous), alias=alias, force=True, tracking_uri=tracking_uri,
                   reason=f"rollback from version {current.version}")
