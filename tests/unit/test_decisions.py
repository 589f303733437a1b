"""Decisions as small objects, without Ray: the promotion gate and the replica load/fallback policy."""

from __future__ import annotations

import pytest

from mlray.config import GateConfig
from mlray.registry import PromotionGate, VersionInfo
from mlray.serving.rollout import LoadPolicy


def _v(version: int, **metrics: float) -> VersionInfo:
    return VersionInfo(name="m", version=version, run_id=f"r{version}", source="s", aliases=[], tags={},
                       metrics=dict(metrics))


@pytest.mark.parametrize(("config", "candidate", "current", "force", "promote", "forced", "says"), [
    (GateConfig(), _v(1, test_accuracy=0.5), None, False, True, False, "no version holds @champion yet"),
    (GateConfig(), _v(2, test_accuracy=0.96), _v(1, test_accuracy=0.95), False, True, False, "passes the gate"),
    (GateConfig(), _v(2, test_accuracy=0.95), _v(1, test_accuracy=0.95), False, True, False, "passes"),  # equal
    (GateConfig(), _v(2, test_accuracy=0.94), _v(1, test_accuracy=0.95), False, False, False,
     "0.9400 is not better than 0.9500 of version 1 (maximize, min improvement 0.0); pass --force"),
    (GateConfig(), _v(2, test_accuracy=0.94), _v(1, test_accuracy=0.95), True, True, True, "forced"),
    (GateConfig(min_improvement=0.02), _v(2, test_accuracy=0.96), _v(1, test_accuracy=0.95), False, False, False,
     "min improvement 0.02"),
    (GateConfig(metric="val_loss", direction="minimize"), _v(2, val_loss=0.2), _v(1, val_loss=0.3), False, True,
     False, "val_loss 0.2000 vs 0.3000"),
    (GateConfig(metric="val_loss", direction="minimize"), _v(2, val_loss=0.4), _v(1, val_loss=0.3), False, False,
     False, "minimize"),
    (GateConfig(), _v(2, test_accuracy=0.9), _v(1), False, True, False, "(version 1) has no test_accuracy"),
    # Nothing to compare or record: refused even when forced.
    (GateConfig(), _v(2), _v(1, test_accuracy=0.9), True, False, False, "has no metric 'test_accuracy'"),
])
def test_promotion_gate(config, candidate, current, force, promote, forced, says):
    decision = PromotionGate(config, force=force).decide(candidate, current)
    assert (decision.promote, decision.forced) == (promote, forced)
    assert says in decision.reason


POLICY = LoadPolicy(retry_failed_after_s=60)


@pytest.mark.parametrize(("target", "loaded", "failed_at", "now", "action"), [
    (3, None, None, 0.0, "load"),          # nothing loaded yet
    (3, 2, None, 0.0, "load"),             # the alias moved
    (3, 3, None, 0.0, "keep"),             # already there
    (3, 2, 100.0, 130.0, "wait"),          # failed 30 s ago: not again yet
    (3, 2, 100.0, 160.0, "load"),          # the retry period has passed
    (None, 2, None, 0.0, "drop"),          # the challenger's alias was deleted
    (None, None, None, 0.0, "keep"),
])
def test_load_policy_decides(target, loaded, failed_at, now, action):
    decision = POLICY.decide(target=target, loaded=loaded, failed_at=failed_at, now=now)
    assert decision.action == action, decision.reason


@pytest.mark.parametrize(("role", "failed", "last_good", "expected"), [
    ("champion", 3, 2, 2),
    ("champion", 3, None, None),    # no version ever answered: the replica cannot start
    ("champion", 3, 3, None),       # the last good is the one that just failed
    ("challenger", 3, 2, None),     # the champion answers alone
])
def test_load_policy_fallback(role, failed, last_good, expected):
    assert POLICY.fallback(role=role, failed=failed, last_good=last_good) == expected
