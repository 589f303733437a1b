"""Following the registry for a many-models app: one watcher deployment holding every model's state.

A many-models app (``models:``) has one :class:`ModelsWatcher` deployment, under the single-model app's
watcher name (``RegistryWatcher``), so ``mlray status`` and ``mlray rollout`` find it the same way:

- It asks the registry where each model's alias points, every ``follow.poll_interval_s``, or for one model
  at once on ``mlray rollout NAME --app APP``.
- Each replica sends it one heartbeat every ``follow.sync_interval_s`` (:class:`~mlray.serving.multi.FleetLink`):
  the models it holds, their versions and failures, and the models it could not load; the answer carries
  every model's targets, which the replica's per-model followers act on (load beside, warm up, swap).
  One call per replica and heartbeat, however many models it holds.

:class:`FleetState` is the bookkeeping (no Ray, no registry): what ``mlray status`` shows and when a
rollout of one model has settled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from ray import serve

from mlray.errors import NotFound
from mlray.serving.config import ServeAppConfig
from mlray.serving.rollout import WATCHER_NAME, resolve_targets, resolve_weight
from mlray.serving.traffic import merge

logger = logging.getLogger(__name__)

LOAD_FAILURE = "load"  # the failure key of a model a replica could not load at all (it holds no version)


class FleetState:
    """Every model's registry targets and every replica's last heartbeat; answers status and "settled?".

    A replica is live while its last heartbeat is younger than ``horizon_s``; only live replicas count.
    """

    def __init__(self, cfgs: dict[str, ServeAppConfig], *, max_models_per_replica: int, horizon_s: float) -> None:
        self.cfgs = cfgs
        self.max_models_per_replica = max_models_per_replica
        self.horizon_s = horizon_s
        self.targets: dict[str, dict[str, int | None]] = {}
        self.errors: dict[str, str] = {}  # model -> why the registry could not say its targets
        self.last_good: dict[str, dict[str, int]] = {}
        self.weights: dict[str, float | None] = {}  # model -> challenger weight set in the registry (a canary's)
        self.replicas: dict[str, dict[str, Any]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=100)

    def event(self, message: str, *, now: float) -> None:
        logger.info(message)
        self.events.append({"time": now, "message": message})

    def set_targets(self, name: str, targets: dict[str, int | None], *, now: float) -> None:
        previous = self.targets.get(name)
        if previous != targets:
            self.event(f"{name}: registry says {targets}" if previous is None else
                       f"{name}: registry moved {previous} -> {targets}", now=now)
        self.targets[name] = targets
        self.errors.pop(name, None)

    def set_weight(self, name: str, weight: float | None, *, now: float) -> None:
        if self.weights.get(name) != weight:
            self.event(f"{name}: challenger weight {self.weights.get(name)} -> {weight}", now=now)
        self.weights[name] = weight

    def set_error(self, name: str, error: str, *, now: float) -> None:
        """The registry could not say: keep the targets known so far (a registry outage must not stop a model)."""
        if self.errors.get(name) != error:
            self.event(f"{name}: registry lookup failed, keeping {self.targets.get(name)}: {error}", now=now)
        self.errors[name] = error

    def record(self, report: dict[str, Any], *, now: float) -> dict[str, Any]:
        """A replica's heartbeat (``held``: model -> versions and failures; ``failures``: model -> why it could
        not load); answers every model's targets."""
        replica = report["replica"]
        previous = self.replicas.get(replica, {}).get("held", {})
        for name, held in report["held"].items():
            for role, version in held["versions"].items():
                if version is not None and previous.get(name, {}).get("versions", {}).get(role) != version:
                    self.last_good.setdefault(name, {})[role] = version
                    self.event(f"replica {replica} answers {name} {role} with version {version}", now=now)
        self.replicas[replica] = {**report, "seen": now}
        return {"targets": self.targets, "last_good": self.last_good, "weights": self.weights}

    def known(self, name: str | None) -> str:
        """``name``, or NotFound naming the app's models."""
        if name is None or name not in self.cfgs:
            raise NotFound(f"model {name!r} is not served by this app; it serves {sorted(self.cfgs)}")
        return name

    def traffic(self, name: str, *, now: float) -> dict[str, Any]:
        """``name``'s requests, 5xx and latency per ``role:vN``, summed over every replica's last report (one
        that went away keeps its counts; a replica that evicts the model starts its counts again), and the
        challenger weight each live replica holding it applies."""
        self.known(name)
        held = {replica: r["held"][name] for replica, r in self.replicas.items() if name in r["held"]}
        live = self.live(now)
        return {"counts": merge([h.get("traffic", {}) for h in held.values()]),
                "challenger_weight": self.weights.get(name),
                "applied_weights": {replica: h.get("challenger_weight") for replica, h in held.items()
                                    if replica in live}}

    def live(self, now: float) -> dict[str, dict[str, Any]]:
        return {k: r for k, r in self.replicas.items() if now - r["seen"] <= self.horizon_s}

    def _on_replica(self, name: str, report: dict[str, Any]) -> dict[str, Any]:
        held = report["held"].get(name)
        failures = dict(held["failures"]) if held else {}
        if name in report["failures"]:
            failures[LOAD_FAILURE] = report["failures"][name]
        return {"held": held is not None, "versions": dict(held["versions"]) if held else {}, "failures": failures}

    def _on_target(self, name: str, on_replicas: dict[str, dict[str, Any]]) -> bool:
        """Every replica that holds the model answers each role with the registry's version."""
        if name in self.errors and name not in self.targets:
            return False
        targets = self.targets.get(name, {})
        return all(r["versions"].get(role) == version for r in on_replicas.values() if r["held"]
                   for role, version in targets.items() if version is not None)

    def model_status(self, name: str, *, now: float) -> dict[str, Any]:
        self.known(name)
        cfg = self.cfgs[name]
        live = self.live(now)
        on_replicas = {replica: {**self._on_replica(name, r), "seen_s_ago": round(now - r["seen"], 1),
                                 "node": r.get("node"), "pid": r.get("pid")} for replica, r in live.items()}
        failures = {replica: r["failures"] for replica, r in on_replicas.items() if r["failures"]}
        if name in self.errors:
            failures["registry"] = {"lookup": self.errors[name]}
        return {"model": name, "alias": cfg.alias, "version": cfg.version, "targets": self.targets.get(name, {}),
                "last_good": self.last_good.get(name, {}), "replicas": on_replicas,
                "held_by": sum(r["held"] for r in on_replicas.values()),
                "on_target": bool(live) and self._on_target(name, on_replicas), "failures": failures}

    def status(self, *, now: float) -> dict[str, Any]:
        models = {name: self.model_status(name, now=now) for name in self.cfgs}
        live = self.live(now)
        return {
            "models": models, "max_models_per_replica": self.max_models_per_replica,
            "replicas": {replica: {"held": sorted(r["held"]), "seen_s_ago": round(now - r["seen"], 1),
                                   "node": r.get("node"), "pid": r.get("pid")} for replica, r in live.items()},
            "on_target": bool(live) and all(m["on_target"] for m in models.values()),
            "failures": {name: m["failures"] for name, m in models.items() if m["failures"]},
            "events": list(self.events)[-20:],
        }

    def settled(self, name: str, *, now: float) -> bool:
        """Whether every live replica holding ``name`` answers with its targets, or failed to load them."""
        live = self.live(now)
        if not live:
            return False
        for report in live.values():
            held = report["held"].get(name)
            if held is None:
                continue
            for role, version in self.targets.get(name, {}).items():
                if version is not None and held["versions"].get(role) != version \
                        and f"{role}:v{version}" not in held["failures"]:
                    return False
        return True


@serve.deployment(name=WATCHER_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class ModelsWatcher:
    """The registry watcher of a many-models app (see the module's docstring)."""

    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
        self.cfg = ServeAppConfig.model_validate(settings)
        cfgs = {str(entry.name): self.cfg.for_model(entry) for entry in self.cfg.entries}
        follow = self.cfg.follow
        self.state = FleetState(cfgs, max_models_per_replica=self.cfg.max_models_per_replica,
                                horizon_s=max(5.0, 3 * follow.sync_interval_s))
        for name in cfgs:  # a model the registry cannot name fails its own requests, not the deploy
            await self.refresh(name)
        if follow.enabled:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.follow.poll_interval_s)
            for name, cfg in self.state.cfgs.items():
                if cfg.version is None or cfg.challenger is not None:
                    await self.refresh(name)

    async def refresh(self, name: str) -> dict[str, int | None]:
        """Ask the registry where ``name``'s aliases point now; a failure keeps what was known."""
        cfg = self.state.cfgs[name]
        try:
            targets = await asyncio.to_thread(resolve_targets, cfg)
            weight = await asyncio.to_thread(resolve_weight, cfg) if cfg.challenger is not None else None
        except Exception as err:  # noqa: BLE001 - a registry outage or a missing alias must not stop the others
            self.state.set_error(name, f"{type(err).__name__}: {err}", now=time.time())
        else:
            self.state.set_targets(name, targets, now=time.time())
            self.state.set_weight(name, weight, now=time.time())
        return self.state.targets.get(name, {})

    async def sync(self, report: dict[str, Any]) -> dict[str, Any]:
        """A replica's heartbeat (:meth:`FleetState.record`)."""
        return self.state.record(report, now=time.time())

    def status(self) -> dict[str, Any]:
        return self.state.status(now=time.time())

    def model_status(self, name: str) -> dict[str, Any]:
        return self.state.model_status(name, now=time.time())

    def traffic(self, model: str | None = None) -> dict[str, Any]:
        """One model's counts (:meth:`FleetState.traffic`); the pipeline's canary reads them."""
        if model is None:
            raise NotFound(f"this app serves {len(self.state.cfgs)} models; name one of {sorted(self.state.cfgs)}")
        return self.state.traffic(model, now=time.time())

    async def check_now(self, timeout_s: float = 60.0, model: str | None = None) -> dict[str, Any]:
        """``mlray rollout NAME --app APP``: ask the registry about ``model`` now and wait until every live
        replica holding it has acted (moved, or failed to)."""
        model = self.state.known(model)
        await self.refresh(model)
        started = time.time()
        await asyncio.sleep(2 * self.cfg.follow.sync_interval_s)  # a heartbeat brings the targets, a follower acts
        while not self.state.settled(model, now=time.time()) and time.time() - started < timeout_s:
            await asyncio.sleep(0.2)
        return self.model_status(model)
