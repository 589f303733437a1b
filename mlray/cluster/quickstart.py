"""The quickstart: from nothing to a served, registered model on a local Ray cluster.

Starts a local Ray head that outlives this process (``mlray down`` stops it), trains the digits
classifier with 2 data-parallel workers, registers it, promotes it to ``@champion`` through the gate,
deploys it on Ray Serve and sends it a few real test images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlray import cluster, settings
from mlray.client import predict
from mlray.config import JobConfig
from mlray.registry import PromotionResult, promote
from mlray.serving.deploy import deploy, load_plan
from mlray.training.data import sample_test_rows
from mlray.training.train import TrainResult, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuickstartResult:
    train: TrainResult
    promotion: PromotionResult | None
    url: str
    dashboard_url: str
    tracking_uri: str
    ray_token_path: str | None = None  # the head's token (token auth), else None
    samples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def quickstart(cfg: JobConfig, *, serve_config: str | None = None, port: int | None = None,
               num_cpus: int = 4, progress: Callable[[str], None] = logger.info) -> QuickstartResult:
    started = time.perf_counter()
    progress("Starting a local Ray cluster (dashboard on 127.0.0.1)")
    head = cluster.start_head(num_cpus=num_cpus)
    cluster.connect(head.address, log_to_driver=False)
    progress(f"Training {cfg.name} with {cfg.train.num_workers} data-parallel workers")
    result = train(cfg, progress=lambda line: progress(f"  {line}"))
    progress(f"Registered {cfg.name} version {result.version} (test accuracy {result.test_accuracy:.4f})")
    promotion: PromotionResult | None
    try:
        promotion = promote(cfg.name, version=result.version, alias="champion", gate=cfg.registry.gate,
                            reason="quickstart")
        progress(f"Promoted version {result.version} to @champion: {promotion.reason}")
    except Exception as err:  # noqa: BLE001 - a refused promotion still serves the current champion
        promotion = None
        progress(f"Version {result.version} was not promoted: {err}")
    plan = load_plan(serve_config, overrides={"model": cfg.name}, port=port)
    progress(f"Deploying models:/{cfg.name}@champion on Ray Serve at {plan.url}")
    url = deploy(plan)
    x, y = sample_test_rows(cfg.data, seed=cfg.seed, count=5)
    answer = predict(url, cfg.name, x)
    samples = [{"true": int(t), "predicted": label, "confidence": float(np.max(p)), "pixels": row.tolist()}
               for row, t, label, p in zip(x, y, answer["labels"], answer["predictions"], strict=True)]
    return QuickstartResult(train=result, promotion=promotion, url=url, dashboard_url=head.dashboard_url,
                            tracking_uri=settings.tracking_uri(), ray_token_path=head.token_path, samples=samples,
                            seconds=time.perf_counter() - started)


def down() -> bool:
    """Stop the Serve apps and the local Ray head that the quickstart (or ``mlray serve``) started."""
    import ray

    record = settings.home() / "cluster.json"
    if record.exists():
        try:
            import json

            from ray import serve

            cluster.apply_env()  # the head's auth, where this process did not get it at start (the venv's hook)
            ray.init(address=json.loads(record.read_text())["address"], log_to_driver=False)
            serve.shutdown()
        except Exception as err:  # noqa: BLE001 - the head may be gone already; stop it regardless
            logger.warning("Could not shut Serve down cleanly: %s", err)
        finally:
            if ray.is_initialized():
                ray.shutdown()
    return cluster.stop_head()
