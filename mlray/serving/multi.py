"""Every model an app serves, routed by name: one :class:`~mlray.serving.core.PredictionCore` per model.

An app lists one model (``model:``) or many (``models:``). Each model gets its own core and its own
``rollout.Follower`` (so a moved alias swaps that model only); :class:`ModelSet` picks the core by the name
in the URL (``/v1/models/{name}:predict``, ``/v2/models/{name}/infer``) or, for ``/invocations``, by the
``x-mlray-model`` header (Serve's ``serve_multiplexed_model_id`` is read too).

- One model: its core is loaded when the replica starts and followed through the app's ``RegistryWatcher``,
  as always. No multiplexing, no extra work per request but a dict lookup.
- Many models: a replica holds at most ``max_models_per_replica`` of them, least recently used first out,
  through Ray Serve's model multiplexing (``serve.multiplexed``), which also tells Serve's routers which
  replica holds which model: a client that sends ``serve_multiplexed_model_id: NAME`` is routed to a
  replica that already holds it. Each replica pre-warms the listed models up to that bound. A request for a
  model the replica does not hold waits for its load up to ``cold_load_timeout_s``, then gets 503 with
  Retry-After (the load goes on). When the app lists more models than one replica keeps, a replica claims
  up to one fewer than that of the models it serves (``x-mlray-affinity: NAME`` on the answer;
  :meth:`ModelSet.claim`) and the HAProxy ingress sends that model's next requests to it (a stick table that
  mlray/_ray/haproxy.py adds to each backend): requests for a model go to the replica that holds it, where
  HAProxy alone would spread them and every replica would load every model. Each model's alias is followed
  by a :class:`LocalWatcher` in the replica, which reads the targets the replica's :class:`FleetLink`
  heartbeat brings from the app's :class:`~mlray.serving.fleet.ModelsWatcher` (and asks the registry itself
  while that cannot be reached).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import mlray
from mlray.errors import BadRequest, ModelLoadError, NotFound, Overloaded
from mlray.serving import oip
from mlray.serving.config import ServeAppConfig
from mlray.serving.core import Call, PredictionCore
from mlray.serving.protocols import Answer

logger = logging.getLogger(__name__)

MODEL_HEADER = "x-mlray-model"
AFFINITY_HEADER = "x-mlray-affinity"  # HAProxy's stick table learns model -> this replica from it
CLAIM_IDLE_S = 60.0  # a claim not used this long lapses (ModelSet.claim)
SERVE_MODEL_HEADER = "serve_multiplexed_model_id"
_SERVER_ROUTES: dict[str, dict[str, Any]] = {"ok": {"status": "ok"}, "live_v2": {"live": True}}


class Answers(Protocol):
    """What the HTTP layers (``fastpath``, ``app``) need: an answer per call and the body limit."""

    max_body_bytes: int

    async def answer(self, call: Call) -> Answer: ...


class _Method:
    """``.remote(...)`` on a coroutine function: a :class:`LocalWatcher` answers as the watcher's handle does."""

    def __init__(self, fn: Callable[..., Awaitable[Any]]) -> None:
        self.remote = fn


class FleetLink:
    """A many-models replica's line to the app's ``ModelsWatcher``: one heartbeat per ``follow.sync_interval_s``
    reports what the replica holds and brings back every model's targets, which its ``LocalWatcher``s read."""

    def __init__(self, watcher: Any, *, replica: str, node: str, pid: int) -> None:
        self.watcher = watcher
        self.replica, self.node, self.pid = replica, node, pid
        self.targets: dict[str, dict[str, int | None]] = {}
        self.last_good: dict[str, dict[str, int]] = {}
        self.weights: dict[str, float | None] = {}

    async def beat(self, models: ModelSet, *, timeout_s: float = 30.0) -> None:
        report = {"replica": self.replica, "node": self.node, "pid": self.pid, "held": models.held_report(),
                  "failures": dict(models.failures)}
        answer = await asyncio.wait_for(self.watcher.sync.remote(report), timeout=timeout_s)
        self.targets, self.last_good = answer["targets"], answer["last_good"]
        self.weights = answer.get("weights", {})

    async def model_status(self, name: str) -> dict[str, Any]:
        return cast(dict[str, Any], await self.watcher.model_status.remote(name))


class LocalWatcher:
    """One model's registry watcher inside a replica of a many-models app (``Follower`` talks to it as to the
    ``RegistryWatcher`` deployment): the targets its replica's :class:`FleetLink` last brought, or, while the
    link has none for the model, the registry's, asked at most every ``follow.poll_interval_s``."""

    def __init__(self, cfg: ServeAppConfig, *, resolve: Callable[[ServeAppConfig], dict[str, int | None]],
                 link: FleetLink | None = None,
                 weigh: Callable[[ServeAppConfig], float | None] = lambda cfg: None) -> None:
        self.cfg = cfg
        self.resolve = resolve
        self.weigh = weigh  # the challenger weight the registry sets (resolve_weight), asked with the targets
        self.link = link
        self.targets: dict[str, int | None] = {}
        self.weight: float | None = None
        self.asked = -float("inf")
        self.last_good: dict[str, int] = {}
        self.report: dict[str, Any] = {}
        self.sync = _Method(self._sync)
        self.status = _Method(self._status)

    async def _sync(self, report: dict[str, Any]) -> dict[str, Any]:
        self.report = report
        for role, version in report["versions"].items():
            self.last_good[role] = version
        if self.link is not None and self.cfg.model in self.link.targets:
            self.targets = self.link.targets[self.cfg.model]
            for role, version in self.link.last_good.get(self.cfg.model, {}).items():
                self.last_good.setdefault(role, version)
            return {"targets": self.targets, "last_good": self.last_good,
                    "challenger_weight": self.link.weights.get(self.cfg.model)}
        pinned = self.cfg.version is not None
        if not self.targets or (not pinned and time.monotonic() - self.asked >= self.cfg.follow.poll_interval_s):
            self.asked = time.monotonic()
            try:
                self.targets = await asyncio.to_thread(self.resolve, self.cfg)
                if self.cfg.challenger is not None:
                    self.weight = await asyncio.to_thread(self.weigh, self.cfg)
            except NotFound:
                raise
            except Exception as err:  # noqa: BLE001 - a registry outage must not stop the model; keep serving
                logger.warning("Registry poll for %s failed, keeping %s: %s", self.cfg.model, self.targets, err)
        return {"targets": self.targets, "last_good": self.last_good, "challenger_weight": self.weight}

    async def _status(self) -> dict[str, Any]:
        if self.link is not None:
            try:
                return await self.link.model_status(self.cfg.model)
            except Exception as err:  # noqa: BLE001 - the watcher may be restarting; this replica's view then
                logger.warning("The app's watcher did not answer (%s); answering this replica's view", err)
        versions = self.report.get("versions", {})
        return {"model": self.cfg.model, "alias": self.cfg.alias, "targets": self.targets,
                "last_good": self.last_good, "replicas": {self.report.get("replica", "?"): {
                    "versions": versions, "failures": self.report.get("failures", {})}},
                "on_target": all(versions.get(r) == v for r, v in self.targets.items() if v is not None)}


@dataclass
class Slot:
    """A model held by a replica: its core and the task that follows its alias (cancelled on eviction)."""

    core: PredictionCore
    task: asyncio.Task[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def __del__(self) -> None:
        # Serve's multiplexing calls this when it evicts the model (from a worker thread).
        if self.task is not None and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.task.cancel)


class ModelSet:
    """The models of one replica, by name; answers every route (see the module's docstring)."""

    def __init__(self, cfg: ServeAppConfig, *, open_slot: Callable[[str], Awaitable[Slot]],
                 held: Callable[[], int] = lambda: 0,
                 evict_first: Callable[[str], None] = lambda name: None) -> None:
        self.cfg = cfg
        assert not any(entry.selects for entry in cfg.entries), "tag and pattern entries are expanded at deploy"
        self.names = [str(entry.name) for entry in cfg.entries]
        self.known = frozenset(self.names)
        self.many = bool(cfg.models)
        self.max_body_bytes = cfg.max_body_bytes
        self.open_slot = open_slot  # name -> Slot; for many models, serve.multiplexed's LRU getter
        self.held = held
        self.evict_first = evict_first  # name -> the next model the LRU evicts (mlray._ray.multiplex)
        self.pinned: dict[str, Slot] = {}  # one model: loaded at start, never evicted
        # many models: the slots still held (weak: an evicted model's memory goes with Serve's reference)
        self.recent: weakref.WeakValueDictionary[str, Slot] = weakref.WeakValueDictionary()
        # many models, more than a replica keeps: the ones this replica claims (their requests come here)
        self.claims: dict[str, float] = {}  # name -> when last served here (time.monotonic())
        self.affine = self.many and cfg.model_affinity and len(self.names) > cfg.max_models_per_replica
        self.failures: dict[str, str] = {}
        self._failed_at: dict[str, float] = {}
        self.started = False

    async def start(self) -> None:
        """Load the single model (a failure fails the replica), or pre-warm up to the bound of many."""
        if not self.many:
            self.pinned[self.names[0]] = await self.open_slot(self.names[0])
        else:
            for name in self.names[: self.cfg.max_models_per_replica]:
                try:
                    self.recent[name] = await self.open_slot(name)
                except Exception as err:  # noqa: BLE001 - one model that cannot load must not stop the others
                    self._failed(name, str(err) if isinstance(err, ModelLoadError) else f"{type(err).__name__}: {err}")
        self.started = True

    def name_of(self, call: Call) -> str:
        name = call.params.get("name") or call.headers.get(MODEL_HEADER) or call.headers.get(SERVE_MODEL_HEADER)
        if name:
            return name
        if not self.many:
            return self.names[0]
        raise BadRequest(f"this app serves {len(self.names)} models; name one in the {MODEL_HEADER!r} header "
                         f"(one of {self.names[:10]}) or use /v1/models/NAME:predict")

    async def core_for(self, name: str) -> PredictionCore:
        if name not in self.known:
            raise NotFound(f"model {name!r} is not served here; this app serves {self.names[:10]}"
                           f"{' and more' if len(self.names) > 10 else ''}")
        slot = self.pinned.get(name)
        if slot is not None:
            return slot.core
        failed_at = self._failed_at.get(name)
        if failed_at is not None and time.monotonic() - failed_at < self.cfg.follow.retry_failed_after_s:
            # a broken model costs one load per follow.retry_failed_after_s, not one per request
            raise ModelLoadError(f"model {name!r} cannot be served: {self.failures[name]}")
        loading = asyncio.ensure_future(self.open_slot(name))
        try:
            slot = await asyncio.wait_for(asyncio.shield(loading), timeout=self.cfg.cold_load_timeout_s)
        except TimeoutError:
            retry = max(1, round(self.cfg.cold_load_timeout_s / 2))
            raise Overloaded(f"model {name!r} is still loading after {self.cfg.cold_load_timeout_s:.0f} s; retry "
                             f"after {retry} s", retry_after_s=retry) from None
        except ModelLoadError as err:
            self._failed(name, str(err))
            raise ModelLoadError(f"model {name!r} cannot be served: {err}") from None
        self.recent[name] = slot
        self.failures.pop(name, None)
        self._failed_at.pop(name, None)
        return slot.core

    def _failed(self, name: str, reason: str) -> None:
        self.failures[name] = reason
        self._failed_at[name] = time.monotonic()
        logger.error("Model %s cannot be served (retried after %.0f s): %s", name,
                     self.cfg.follow.retry_failed_after_s, reason)

    async def answer(self, call: Call) -> Answer:
        if "name" not in call.params and call.route.predict is None:
            return self._server(call)
        name = self.name_of(call)
        cold = self.many and not self._holds(name)
        started = time.perf_counter()
        core = await self.core_for(name)
        waited_s = time.perf_counter() - started
        body, headers = await core.answer(call)
        if self.many:
            headers["x-models-loaded"] = str(self.held())
            if cold:  # it waited for its model's load (W3C Server-Timing): what a client or a bench tells apart
                headers["server-timing"] = f"load;dur={waited_s * 1000:.1f}"
            if self.affine:
                if self.claim(name):
                    headers[AFFINITY_HEADER] = name
                else:  # a model no replica has room to claim: the first out, so that the claimed ones stay
                    self.evict_first(name)
        return body, headers

    def claim(self, name: str) -> bool:
        """Whether this replica claims ``name``'s requests (HAProxy then sends them here, mlray/_ray/haproxy.py).

        It claims up to ``max_models_per_replica - 1`` models (one, if it keeps one), first come, so that what
        HAProxy sends it fits in what it keeps once every model has its replica, with one place left for the
        models no replica has room to claim: those are balanced as without affinity, and the least recently
        used model the replica evicts for them is then one of them, not a claimed one: an unclaimed model is
        made the next one out once answered (:meth:`answer`). A claim stays while the model is asked for here,
        loaded or evicted, and lapses after ``CLAIM_IDLE_S`` unused (its requests go to another replica now:
        HAProxy reloaded, when Serve added or removed a replica)."""
        now = time.monotonic()
        if name in self.claims:
            self.claims[name] = now
            return True
        for stale in [model for model, used in self.claims.items() if now - used > CLAIM_IDLE_S]:
            del self.claims[stale]
        if len(self.claims) < max(1, self.cfg.max_models_per_replica - 1):
            self.claims[name] = now
            return True
        return False

    def _holds(self, name: str) -> bool:
        slot = self.recent.get(name)
        return slot is not None and not (slot.task is not None and slot.task.done())

    def _server(self, call: Call) -> Answer:
        """The routes about the server, not a model."""
        handler = call.route.handler
        if handler in _SERVER_ROUTES:
            return dict(_SERVER_ROUTES[handler]), {}
        if handler == "ready_v2":
            return {"ready": self.started and (self.many or bool(self.pinned))}, {}
        return oip.server_metadata(version=mlray.__version__), {}

    def primary(self) -> PredictionCore | None:
        """The core the OpenAPI document describes: the first model's, once loaded."""
        slot = self.pinned.get(self.names[0]) or self.recent.get(self.names[0])
        return slot.core if slot is not None else None

    def held_report(self) -> dict[str, dict[str, Any]]:
        """The models this replica holds now: each one's versions by role and its failed versions."""
        held: dict[str, dict[str, Any]] = {}
        for name, slot in list({**self.recent, **self.pinned}.items()):
            if slot.task is not None and slot.task.done():
                continue  # evicted: Serve let go of it, its follower stopped
            versions = slot.core.versions
            held[name] = {"versions": {role: m.info.version for role, m in versions.models.items()},
                          "failures": dict(versions.failures)}
            if slot.core.cfg.challenger is not None:  # what a canary of this model reads
                held[name]["traffic"] = versions.traffic_report()
                held[name]["challenger_weight"] = versions.challenger_weight
        return held

    def check_health(self) -> None:
        """The single model must answer; with many, a model that cannot load is its own requests' 503."""
        for slot in self.pinned.values():
            slot.core.check_health()

