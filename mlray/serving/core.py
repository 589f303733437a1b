"""The prediction core: every route's answer, without Ray.

:class:`PredictionCore` answers each route of the table (:mod:`mlray.serving.routes`): admission first (a
refused request costs no reading or parsing), then the body parsed by the route's protocol, the
champion/challenger choice, the model call (micro-batched), the shadow copy, and the answer. The Serve
deployment (``app.ModelServer``) builds one per replica over its ``rollout.Follower``; the unit tests build
one over models loaded in the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

import mlray
from mlray.errors import InvalidInput, NotFound
from mlray.registry import lineage_of
from mlray.serving import oip, outputs
from mlray.serving.admission import Admission
from mlray.serving.batching import MicroBatcher
from mlray.serving.config import ServeAppConfig
from mlray.serving.foreign import PyfuncModel
from mlray.serving.loader import ServedModel
from mlray.serving.protocols import Answer, Limits
from mlray.serving.routes import Route

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Call:
    """One request as a handler sees it: the route, its path parameters, lower-case headers, the body."""

    route: Route
    params: Mapping[str, str]
    headers: Mapping[str, str]
    read_body: Callable[[], Awaitable[bytes]]


class Models(Protocol):
    """What the core needs from whoever keeps the versions (``rollout.Follower`` in a replica)."""

    @property
    def models(self) -> dict[str, ServedModel]: ...

    @property
    def failures(self) -> dict[str, str]: ...

    def record_shadow(self, record: dict[str, Any]) -> None: ...

    def record_call(self, role: str, version: int, seconds: float, *, ok: bool) -> None: ...

    @property
    def challenger_weight(self) -> float | None: ...

    def traffic_report(self) -> dict[str, Any]:
        """The ``record_call`` counts so far, per ``role:vN`` (``TrafficCounter.to_dict``)."""
        ...

    async def rollout_status(self) -> dict[str, Any]: ...


def bucket(key: str) -> float:
    """A stable draw in [0, 1) for a request key: the same key always lands on the same side."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


class PredictionCore:
    def __init__(self, cfg: ServeAppConfig, models: Models, *, metrics: Any = None) -> None:
        self.cfg = cfg
        self.versions = models
        self.metrics = metrics  # ServingMetrics in a replica; None where Ray's metrics cannot exist
        adm = cfg.admission
        self.admission = Admission(max_ongoing=adm.max_ongoing_requests, max_queued=adm.max_queued_requests,
                                   timeout_s=adm.timeout_s, retry_after_s=adm.retry_after_s)
        self.limits = Limits(max_rows=cfg.max_rows, max_body_bytes=cfg.max_body_bytes)
        self.max_body_bytes = cfg.max_body_bytes
        self._batcher = MicroBatcher(self._predict_batch, max_batch_size=cfg.batching.max_batch_size,
                                     wait_s=cfg.batching.batch_wait_timeout_s)
        self.background: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    @property
    def champion(self) -> ServedModel:
        return self.versions.models["champion"]

    def check_name(self, name: str) -> None:
        if name != self.cfg.model:
            raise NotFound(f"model {name!r} is not served here; this app serves {self.cfg.model!r}")

    # -- the prediction path, shared by every protocol -------------------------------------------------------

    def choose(self, headers: Mapping[str, str]) -> str:
        challenger = self.cfg.challenger
        if challenger is None or challenger.mode != "split" or "challenger" not in self.versions.models:
            return "champion"
        key = headers.get(challenger.sticky_header.lower())
        draw = bucket(key) if key else random.random()
        # A weight set in the registry (a canary's current step) wins over the app's static one.
        live = self.versions.challenger_weight
        return "challenger" if draw < (challenger.weight if live is None else live) else "champion"

    def _observe_batch(self, rows: int, served: ServedModel) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(rows, model=self.cfg.model, version=str(served.info.version))

    def _predict_batch(self, calls: list[tuple[ServedModel, np.ndarray]]) -> list[np.ndarray]:
        # Requests that arrived together, perhaps for different versions: one model call per version.
        out: list[np.ndarray | Exception | None] = [None] * len(calls)
        groups: dict[int, list[int]] = {}
        for i, (served, _) in enumerate(calls):
            groups.setdefault(id(served), []).append(i)
        for indices in groups.values():
            served = calls[indices[0]][0]
            arrays = [calls[i][1] for i in indices]
            try:
                probabilities = served.loaded.predict(np.concatenate(arrays))  # (sum N, K)
            except Exception as err:  # noqa: BLE001 - one version failing (a canary) fails only its own requests
                for i in indices:
                    out[i] = err  # the batcher raises it for that caller
                continue
            self._observe_batch(len(probabilities), served)
            for i, part in zip(indices, np.split(probabilities, np.cumsum([len(a) for a in arrays])[:-1]),
                               strict=True):
                out[i] = part
        return cast(list[np.ndarray], out)

    async def run_model(self, served: ServedModel, x: np.ndarray) -> np.ndarray:
        batching = self.cfg.batching
        if batching.enabled and len(x) < batching.max_batch_size:
            return await self._batcher.submit((served, x))
        self._observe_batch(len(x), served)
        return served.loaded.predict(x)  # a request this large is a batch already

    async def predict(self, call: Call) -> Answer:
        """A prediction route: its protocol parses the body into (N, F) and writes the answer."""
        protocol = call.route.predict
        assert protocol is not None, f"{call.route.path} is not a prediction route"
        name = call.params.get("name")
        if name is not None:
            self.check_name(name)
        async with self.admission.admit() as left_s:
            x, parsed = protocol.parse(await call.read_body(), call.headers, self.champion.loaded, self.limits)
            if isinstance(self.champion.loaded, PyfuncModel):
                self.champion.loaded.check_input(x)  # the signature's types, before the rows join a batch
            role = self.choose(call.headers)
            served = self.versions.models[role]
            started = time.perf_counter()
            try:
                probabilities = await self.admission.run(self.run_model(served, x), left_s=left_s)
            except Exception as err:
                # Counted per role for a canary's decision: a 5xx is the version's failure, a 4xx the input's.
                ok = getattr(err, "status_code", 500) < 500
                self.versions.record_call(role, served.info.version, time.perf_counter() - started, ok=ok)
                raise
            self.versions.record_call(role, served.info.version, time.perf_counter() - started, ok=True)
        if not np.isfinite(probabilities).all():
            # JSON has no NaN. Every version passed a finite warm-up, and rows that overflow float32 were computed
            # again in float64 (LoadedModel.predict), so it is this input: a regressor's value beyond float32, or
            # a model with no float64 form. A 4xx naming the rows, not a bare 500.
            rows = np.flatnonzero(~np.isfinite(probabilities).all(axis=1))
            raise InvalidInput(f"version {served.info.version} gives no finite output for row(s) "
                               f"{rows[:10].tolist()} of this request: their values (largest |x| = "
                               f"{float(np.abs(x[rows]).max()):.3g}) overflow the model")
        challenger = self.cfg.challenger
        if challenger is not None and challenger.mode == "shadow" and "challenger" in self.versions.models:
            if len(self.background) < self.admission.max_ongoing:  # shadows never pile up behind clients
                self.spawn(self._shadow(x, served, probabilities))
        body, headers = protocol.respond(probabilities, parsed, served, name or served.info.name)
        info = served.info
        headers.update({"x-model-name": info.name, "x-model-version": str(info.version),
                        "x-model-run-id": info.run_id, "x-model-role": role, "x-model-variant": served.loaded.variant,
                        "x-request-id": call.headers.get("x-request-id") or uuid.uuid4().hex})
        return body, headers

    async def _shadow(self, x: np.ndarray, champion: ServedModel, answered: np.ndarray) -> None:
        challenger = self.versions.models.get("challenger")
        if challenger is None:
            return
        try:
            shadow = await self.run_model(challenger, x)
        except Exception as err:  # noqa: BLE001 - a failing shadow never affects clients; it is counted
            logger.warning("Shadow prediction by version %s failed: %s", challenger.info.version, err)
            return
        agree = outputs.agree(answered, shadow, champion.loaded)
        record = {
            "time": time.time(), "rows": len(x), "champion_version": champion.info.version,
            "challenger_version": challenger.info.version, "agree": agree,
            "max_abs_diff": float(np.abs(shadow - answered).max()),
        }
        if champion.loaded.task == "classification":
            record.update(champion_labels=answered.argmax(1).tolist()[:16],
                          challenger_labels=shadow.argmax(1).tolist()[:16])
        self.versions.record_shadow(record)
        if self.metrics is not None:
            self.metrics.shadow.inc(tags={"model": self.cfg.model, "version": str(challenger.info.version),
                                          "agree": str(agree).lower()})

    # -- the other routes ------------------------------------------------------------------------------------

    async def ok(self, call: Call) -> Answer:
        return {"status": "ok"}, {}

    async def metadata_v1(self, call: Call) -> Answer:
        self.check_name(call.params["name"])
        served = self.champion
        info, loaded = served.info, served.loaded
        body = {
            "name": info.name, "ready": True, "version": info.version, "alias": served.alias,
            "run_id": info.run_id, "metrics": info.metrics, "lineage": lineage_of(info),
            "inputs": {"num_features": loaded.num_features, "feature_names": loaded.feature_names, "dtype": "float32",
                       **(loaded.spec.describe() if isinstance(loaded, PyfuncModel) else {})},
            "classes": loaded.class_names, "task": loaded.task, "device": str(loaded.device),
            "variant": loaded.variant,
            "load_seconds": round(served.load_seconds, 3),
            "versions": {role: m.info.version for role, m in self.versions.models.items()},
            "failures": self.versions.failures,
        }
        return body, {"x-model-name": info.name, "x-model-version": str(info.version),
                      "x-model-run-id": info.run_id, "x-model-role": "champion", "x-model-variant": loaded.variant}

    async def rollout_status(self, call: Call) -> Answer:
        """The watcher's view: targets, every replica's versions and load failures, shadow summary."""
        self.check_name(call.params["name"])
        return await self.versions.rollout_status(), {}

    async def server_metadata_v2(self, call: Call) -> Answer:
        return oip.server_metadata(version=mlray.__version__), {}

    async def live_v2(self, call: Call) -> Answer:
        return {"live": True}, {}

    async def ready_v2(self, call: Call) -> Answer:
        return {"ready": "champion" in self.versions.models}, {}

    async def model_metadata_v2(self, call: Call) -> Answer:
        name = call.params["name"]
        self.check_name(name)
        served = self.champion
        return oip.model_metadata(name=name, version=str(served.info.version),
                                  num_features=served.loaded.num_features, class_names=served.loaded.class_names,
                                  outputs=outputs.v2_output_metadata(served.loaded)), {}

    async def model_ready_v2(self, call: Call) -> Answer:
        name = call.params["name"]
        self.check_name(name)
        return {"name": name, "ready": "champion" in self.versions.models}, {}

    async def answer(self, call: Call) -> Answer:
        handler: Callable[[Call], Awaitable[Answer]] = getattr(self, call.route.handler)
        return await handler(call)

    def check_health(self) -> None:
        """A champion that cannot answer raises (Serve then restarts the replica)."""
        loaded = self.champion.loaded
        loaded.predict(np.zeros((1, loaded.num_features), dtype=np.float32))
