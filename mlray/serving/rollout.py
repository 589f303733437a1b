"""Following the registry: the app moves to a new version when its alias moves, without failing a request.

Two halves, one per side of a Serve handle:

- :class:`RegistryWatcher`, a one-replica deployment in every mlray app, asks the registry which version
  each role (``champion``, ``challenger``) should answer with, every ``follow.poll_interval_s`` or at once
  on ``mlray rollout``. It also collects what each replica reports (versions loaded, load failures,
  shadow comparisons), which is what ``mlray status`` shows.
- :class:`Follower`, inside each ``ModelServer`` replica, asks the watcher every ``follow.sync_interval_s``
  and, when a role's version changed, downloads, verifies and warms the new version up *beside* the one
  serving, then swaps the reference. Requests already running finish on the old model; a version that
  fails to load or warm up never takes traffic, and is retried only after ``retry_failed_after_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import deque
from typing import Any

import numpy as np
from ray import serve

from mlray.errors import ModelLoadError, NotFound
from mlray.serving.config import ServeAppConfig
from mlray.serving.loader import ServedModel, load_registered
from mlray.serving.traffic import TrafficCounter, merge

logger = logging.getLogger(__name__)

WATCHER_NAME = "RegistryWatcher"
ROLES = ("champion", "challenger")


def resolve_targets(cfg: ServeAppConfig) -> dict[str, int | None]:
    """role -> version the registry says should serve now (the challenger may be absent: None)."""
    from mlray.registry import get_version

    if cfg.version is not None:
        targets: dict[str, int | None] = {"champion": cfg.version}
    else:
        assert cfg.alias is not None
        targets = {"champion": get_version(cfg.model, alias=cfg.alias, tracking_uri=cfg.tracking_uri).version}
    if cfg.challenger is not None:
        try:
            targets["challenger"] = get_version(cfg.model, alias=cfg.challenger.alias,
                                                tracking_uri=cfg.tracking_uri).version
        except NotFound:
            targets["challenger"] = None
    return targets


def resolve_weight(cfg: ServeAppConfig) -> float | None:
    """The challenger's share of requests set in the registry (a canary's step), or None: the app's own."""
    from mlray.registry import challenger_weight

    return challenger_weight(cfg.model, tracking_uri=cfg.tracking_uri) if cfg.challenger is not None else None


@serve.deployment(name=WATCHER_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class RegistryWatcher:
    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
        self.cfg = ServeAppConfig.model_validate(settings)
        self.targets = await asyncio.to_thread(resolve_targets, self.cfg)  # NotFound here fails the deploy
        self.challenger_weight = await asyncio.to_thread(resolve_weight, self.cfg)
        self.last_good: dict[str, int] = {}
        self.replicas: dict[str, dict[str, Any]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=100)
        keep = self.cfg.challenger.shadow_records if self.cfg.challenger else 1
        self.shadow: deque[dict[str, Any]] = deque(maxlen=keep)
        self.shadow_total = 0
        self.shadow_agreed = 0
        self._event(f"serving {self.cfg.model}: {self.targets}")
        if self.cfg.follow.enabled and self.cfg.version is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def _event(self, message: str) -> None:
        logger.info(message)
        self.events.append({"time": time.time(), "message": message})

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.follow.poll_interval_s)
            try:
                await self.refresh()
            except Exception as err:  # noqa: BLE001 - a registry outage must not stop the app; keep serving
                self._event(f"registry poll failed, keeping {self.targets}: {err}")

    async def refresh(self) -> dict[str, int | None]:
        targets = await asyncio.to_thread(resolve_targets, self.cfg)
        weight = await asyncio.to_thread(resolve_weight, self.cfg)
        if targets != self.targets:
            self._event(f"registry moved: {self.targets} -> {targets}")
            self.targets = targets
        if weight != self.challenger_weight:
            self._event(f"challenger weight: {self.challenger_weight} -> {weight}")
            self.challenger_weight = weight
        return targets

    async def sync(self, report: dict[str, Any]) -> dict[str, Any]:
        """A replica's heartbeat: what it serves and what failed; answers what it should serve."""
        replica = report["replica"]
        previous = self.replicas.get(replica, {})
        for role, version in report["versions"].items():
            if version is not None and previous.get("versions", {}).get(role) != version:
                self.last_good[role] = version
                self._event(f"replica {replica} answers {role} with version {version}")
        for key, error in report["failures"].items():
            if key not in previous.get("failures", {}):
                self._event(f"replica {replica} could not load {key}: {error}")
        self.replicas[replica] = {**report, "seen": time.time()}
        for record in report.get("shadow", []):
            self.shadow.append(record)
            self.shadow_total += 1
            self.shadow_agreed += int(record["agree"])
        return {"targets": self.targets, "last_good": self.last_good, "challenger_weight": self.challenger_weight}

    def traffic(self, model: str | None = None) -> dict[str, Any]:
        """Requests, 5xx errors and latency histogram per ``role:vN``, summed over every replica's last report
        (cumulative: a replica that went away keeps its counts), with the weight each live replica applies.
        ``model``, when given, must be the app's (a many-models app's watcher takes the same call)."""
        if model is not None and model != self.cfg.model:
            raise NotFound(f"model {model!r} is not served by this app; it serves {self.cfg.model!r}")
        return {"counts": merge([r.get("traffic", {}) for r in self.replicas.values()]),
                "challenger_weight": self.challenger_weight,
                "applied_weights": {k: r.get("challenger_weight") for k, r in self._live().items()}}

    def _live(self) -> dict[str, dict[str, Any]]:
        horizon = max(5.0, 3 * self.cfg.follow.sync_interval_s)
        return {k: v for k, v in self.replicas.items() if time.time() - v["seen"] <= horizon}

    def _settled(self) -> bool:
        live = self._live()
        if not live:
            return False
        for report in live.values():
            for role, version in self.targets.items():
                loaded = report["versions"].get(role)
                failed = f"{role}:v{version}" in report["failures"]
                if version is not None and loaded != version and not failed:
                    return False
        return True

    async def check_now(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """``mlray rollout``: ask the registry now and wait until every live replica has acted."""
        await self.refresh()
        started = time.time()
        await asyncio.sleep(self.cfg.follow.sync_interval_s)  # let every replica hear about the new targets
        while not self._settled() and time.time() - started < timeout_s:
            await asyncio.sleep(0.2)
        return self.status()

    def status(self) -> dict[str, Any]:
        live = self._live()
        failures = {f"{replica}": report["failures"] for replica, report in live.items() if report["failures"]}
        on_target = all(
            report["versions"].get(role) == version
            for report in live.values() for role, version in self.targets.items() if version is not None
        )
        return {
            "model": self.cfg.model, "alias": self.cfg.alias, "targets": self.targets, "last_good": self.last_good,
            "replicas": {replica: {"versions": r["versions"], "failures": r["failures"],
                                   "seen_s_ago": round(time.time() - r["seen"], 1), "node": r.get("node"),
                                   "pid": r.get("pid")}
                         for replica, r in live.items()},
            "on_target": bool(live) and on_target, "failures": failures,
            "challenger_weight": self.challenger_weight,
            "shadow": {"compared": self.shadow_total, "agreed": self.shadow_agreed},
            "events": list(self.events)[-20:],
        }

    def shadow_records(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self.shadow)[-limit:]


@dataclasses.dataclass(frozen=True)
class LoadDecision:
    """What a replica does about one role: ``keep`` what it serves, ``load`` the target beside it, ``drop``
    the role (its alias is gone), or ``wait`` (the target failed recently; retried later)."""

    action: str
    reason: str


class LoadPolicy:
    """When a replica loads a role's target version, and what it falls back to when that fails.

    A version that failed to load or warm up is retried only ``retry_failed_after_s`` after its failure, so
    a broken upload costs one attempt per period, not one per heartbeat. At start a champion that fails
    falls back to the last version any replica answered with (the watcher's ``last_good``); a challenger
    has no fallback: the champion answers alone until the challenger's alias moves.
    """

    def __init__(self, *, retry_failed_after_s: float) -> None:
        self.retry_failed_after_s = retry_failed_after_s

    def decide(self, *, target: int | None, loaded: int | None, failed_at: float | None,
               now: float) -> LoadDecision:
        if target is None:
            return LoadDecision("drop", "the alias is gone") if loaded is not None else LoadDecision(
                "keep", "no alias, nothing loaded")
        if loaded == target:
            return LoadDecision("keep", f"version {target} already answers")
        if failed_at is not None and now - failed_at < self.retry_failed_after_s:
            return LoadDecision("wait", f"version {target} failed {now - failed_at:.0f} s ago; retried after "
                                        f"{self.retry_failed_after_s:.0f} s")
        return LoadDecision("load", f"version {target} wanted, {loaded} answers")

    def fallback(self, *, role: str, failed: int, last_good: int | None) -> int | None:
        """The version to start on after ``failed`` could not load, or None (then a champion cannot start)."""
        if role != "champion" or last_good is None or last_good == failed:
            return None
        return last_good


class Follower:
    """The replica side: which model answers each role, and moving to new versions safely."""

    def __init__(self, cfg: ServeAppConfig, watcher: Any, *, replica: str, node: str, metrics: Any) -> None:
        self.cfg = cfg
        self.watcher = watcher
        self.replica = replica
        self.node = node
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self.failures: dict[str, str] = {}  # "role:vN" -> error
        self._failed_at: dict[str, float] = {}
        self._shadow_out: list[dict[str, Any]] = []
        self.traffic: dict[str, TrafficCounter] = {}
        self.challenger_weight: float | None = None  # the registry's, from the watcher; None: cfg's weight
        self.policy = LoadPolicy(retry_failed_after_s=cfg.follow.retry_failed_after_s)

    def report(self) -> dict[str, Any]:
        shadow, self._shadow_out = self._shadow_out, []
        return {"replica": self.replica, "node": self.node, "pid": os.getpid(), "failures": dict(self.failures),
                "shadow": shadow, "challenger_weight": self.challenger_weight,
                "traffic": self.traffic_report(),
                "versions": {role: m.info.version for role, m in self.models.items()}}

    def traffic_report(self) -> dict[str, Any]:
        return {key: counter.to_dict() for key, counter in self.traffic.items()}

    def record_shadow(self, record: dict[str, Any]) -> None:
        self._shadow_out.append(record)

    def record_call(self, role: str, version: int, seconds: float, *, ok: bool) -> None:
        self.traffic.setdefault(f"{role}:v{version}", TrafficCounter()).record(seconds, ok=ok)

    async def start(self) -> None:
        """Load what the watcher says (or the registry, if the watcher cannot be reached yet)."""
        try:
            answer = await asyncio.wait_for(self.watcher.sync.remote(self.report()), timeout=30)
            targets, last_good = answer["targets"], answer["last_good"]
            self.challenger_weight = answer.get("challenger_weight")
        except Exception as err:  # noqa: BLE001 - the watcher may be restarting; the registry is the truth
            logger.warning("Watcher not reachable (%s); resolving %s in the registry", err, self.cfg.target)
            targets, last_good = await asyncio.to_thread(resolve_targets, self.cfg), {}
        for role, version in targets.items():
            if version is None:
                continue
            try:
                await self._load(role, version)
            except ModelLoadError:
                fallback = self.policy.fallback(role=role, failed=version, last_good=last_good.get(role))
                if fallback is None:
                    if role == "champion":
                        raise
                    continue
                logger.warning("Starting on the last good %s, version %s, instead", role, fallback)
                await self._load(role, fallback)

    async def run(self) -> None:
        """The replica's heartbeat: follow the registry (unless pinned or told not to), refresh gauges."""
        following = self.cfg.follow.enabled and self.cfg.version is None
        while True:
            await asyncio.sleep(self.cfg.follow.sync_interval_s)
            try:
                if following:
                    await self.sync_once()
            except Exception as err:  # noqa: BLE001 - keep serving what is loaded; try again next tick
                logger.warning("Sync with the registry watcher failed: %s", err)
            self.export_gauges()

    def export_gauges(self) -> None:
        """Ray exports a gauge's value once after it is set, so the current state is set on every tick;
        request counts gathered since the last tick go to Ray too."""
        self.metrics.flush()
        for role, served in self.models.items():
            version = served.info.version
            self.metrics.serving_version.set(version, tags={"model": self.cfg.model, "role": role})
            self.metrics.load_seconds.set(served.load_seconds, tags={"model": self.cfg.model, "version": str(version)})

    async def sync_once(self) -> None:
        answer = await self.watcher.sync.remote(self.report())
        self.challenger_weight = answer.get("challenger_weight")
        wanted = {f"{role}:v{version}" for role, version in answer["targets"].items() if version is not None}
        for key in [k for k in self.failures if k not in wanted]:  # the registry moved on from a bad version
            self.failures.pop(key)
            self._failed_at.pop(key, None)
        for role, version in answer["targets"].items():
            current = self.models.get(role)
            key = f"{role}:v{version}"
            decision = self.policy.decide(target=version, loaded=current.info.version if current else None,
                                          failed_at=self._failed_at.get(key) if key in self.failures else None,
                                          now=time.time())
            if decision.action == "drop":
                logger.info("The %s alias is gone; %s stops answering", role, role)
                self.models.pop(role, None)
            elif decision.action == "load":
                assert version is not None
                try:
                    await self._load(role, version)
                except ModelLoadError:
                    pass  # recorded in _load; the current version keeps serving

    async def _load(self, role: str, version: int) -> None:
        key = f"{role}:v{version}"
        started = time.perf_counter()
        try:
            served = await asyncio.to_thread(self._load_and_warm, version)
        except Exception as err:  # noqa: BLE001 - any failure means this version must not take traffic
            message = f"{type(err).__name__}: {err}"
            self.failures[key] = message
            self._failed_at[key] = time.time()
            self.metrics.load_failures.inc(tags={"model": self.cfg.model, "version": str(version)})
            keeping = self.models.get(role)
            logger.error("Version %s for %s failed to load (%s); %s", version, role, message,
                         f"version {keeping.info.version} keeps serving" if keeping else "nothing to fall back to")
            raise ModelLoadError(message) from err
        alias = self.cfg.alias if role == "champion" else (self.cfg.challenger.alias if self.cfg.challenger else None)
        seconds = time.perf_counter() - started
        self.models[role] = dataclasses.replace(served, alias=alias, load_seconds=seconds)  # the swap
        self.failures.pop(key, None)
        self.metrics.load_seconds.set(seconds, tags={"model": self.cfg.model, "version": str(version)})
        self.metrics.serving_version.set(version, tags={"model": self.cfg.model, "role": role})
        logger.info("Now answering %s with version %s (loaded and warmed up in %.2f s)", role, version, seconds)

    def _load_and_warm(self, version: int) -> ServedModel:
        served = load_registered(self.cfg.model, version=version, tracking_uri=self.cfg.tracking_uri,
                                 allow_pickle=self.cfg.allow_pickle)
        rows = self.cfg.follow.warmup_rows
        warm = served.loaded.predict_proba(np.zeros((rows, served.loaded.num_features), dtype=np.float32))
        if warm.shape != (rows, served.loaded.num_outputs) or not np.isfinite(warm).all():
            raise ModelLoadError(f"version {version} answered its warm-up batch with shape {warm.shape} "
                                 f"or non-finite values")
        return served
