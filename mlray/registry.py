"""The model registry: versions, aliases, and the promotion gate.

Training registers versions here; serving resolves ``NAME@ALIAS`` here. They never import each other.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from mlray.config import GateConfig
from mlray.errors import MlrayError, NotFound, PromotionRefused
from mlray.tracking import client

logger = logging.getLogger(__name__)

GATE_TAG_PREFIX = "mlray.gate."
PROMOTION_TAG_PREFIX = "mlray.promotion."


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


def _better(candidate: float, current: float, gate: GateConfig) -> bool:
    if gate.direction == "maximize":
        return candidate >= current + gate.min_improvement
    return candidate <= current - gate.min_improvement


def promote(name: str, *, version: int, alias: str = "champion", gate: GateConfig | None = None,
            force: bool = False, reason: str = "", tracking_uri: str | None = None) -> PromotionResult:
    """Move ``alias`` to ``version`` if it passes the gate against the alias's current version.

    Refused (:class:`PromotionRefused`, alias untouched) when the candidate is worse on the gate's metric
    by the gate's rule; ``force=True`` overrides, and the override is recorded in the version's tags.
    """
    gate = gate or GateConfig()
    candidate = get_version(name, version=version, tracking_uri=tracking_uri)
    try:
        current: VersionInfo | None = get_version(name, alias=alias, tracking_uri=tracking_uri)
    except NotFound:
        current = None
    if current is not None and current.version == candidate.version:
        return PromotionResult(name, alias, version, current.version, force, "already there")

    if current is None:
        decision = f"no version holds @{alias} yet"
    else:
        if gate.metric not in candidate.metrics:
            raise PromotionRefused(f"version {version} of {name!r} has no metric {gate.metric!r} to gate on")
        new, old = candidate.metrics[gate.metric], current.metrics.get(gate.metric)
        if old is None:
            decision = f"@{alias} (version {current.version}) has no {gate.metric}"
        elif _better(new, old, gate):
            decision = (f"{gate.metric} {new:.4f} vs {old:.4f} of version {current.version} passes the gate "
                        f"({gate.direction}, min improvement {gate.min_improvement})")
        elif force:
            decision = f"forced: {gate.metric} {new:.4f} vs {old:.4f} of version {current.version} fails the gate"
        else:
            raise PromotionRefused(
                f"refused to move {name}@{alias} to version {version}: {gate.metric} {new:.4f} is not better "
                f"than {old:.4f} of version {current.version} ({gate.direction}, min improvement "
                f"{gate.min_improvement}); pass --force to override"
            )

    mlflow_client = client(tracking_uri)
    prefix = f"{PROMOTION_TAG_PREFIX}{alias}."
    tags = {
        f"{prefix}from_version": str(current.version) if current else "",
        f"{prefix}reason": reason or decision,
        f"{prefix}gate": decision,
        f"{prefix}time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        f"{prefix}forced": str(bool(force and decision.startswith("forced"))).lower(),
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
