"""The canary's decision: given what each side answered while a weight was held, advance, hold or roll back.

A small object with one method, as Ray Train's failure policy: :meth:`CanaryPolicy.decide` is a pure
function of the figures (unit-tested without Ray); the watch step gathers the figures from the app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mlray.pipeline.config import CanaryStep
from mlray.serving.traffic import Window


@dataclass(frozen=True)
class CanaryDecision:
    action: Literal["advance", "hold", "rollback"]
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


class CanaryPolicy:
    """Whether the challenger may take the next weight.

    Rolled back as soon as its 5xx rate exceeds the champion's by more than ``max_error_rate_increase``
    (at any time: a model that raises must not wait for the hold to end), or, once it answered
    ``min_requests``, when its p99 exceeds ``max_p99_ratio`` x the champion's + ``p99_slack_s``. It advances
    after ``hold_s`` with ``min_requests`` answered within bounds; a step still short of ``min_requests``
    after ``max_hold_s`` is rolled back (not enough traffic to judge).
    """

    def __init__(self, config: CanaryStep) -> None:
        self.config = config

    def decide(self, *, weight: float, champion: Window, challenger: Window, held_s: float) -> CanaryDecision:
        cfg = self.config
        figures = {"weight": weight, "held_s": round(held_s, 1), "champion": champion.to_dict(),
                   "challenger": challenger.to_dict()}
        at = f"at weight {weight:g} after {held_s:.0f} s"
        bound = champion.error_rate + cfg.max_error_rate_increase
        if challenger.errors and challenger.error_rate > bound:
            return CanaryDecision("rollback", f"challenger error rate {challenger.error_rate:.4f} "
                                  f"({challenger.errors}/{challenger.requests}) exceeds the champion's "
                                  f"{champion.error_rate:.4f} + {cfg.max_error_rate_increase} {at}", figures)
        enough = challenger.requests >= cfg.min_requests
        if enough and challenger.p99_s is not None and champion.p99_s is not None:
            limit = cfg.max_p99_ratio * champion.p99_s + cfg.p99_slack_s
            if challenger.p99_s > limit:
                return CanaryDecision("rollback", f"challenger p99 {challenger.p99_s * 1000:.1f} ms exceeds "
                                      f"{cfg.max_p99_ratio:g} x the champion's {champion.p99_s * 1000:.1f} ms + "
                                      f"{cfg.p99_slack_s * 1000:.0f} ms {at}", figures)
        if held_s < cfg.hold_s:
            return CanaryDecision("hold", f"holding weight {weight:g}: {held_s:.0f} of {cfg.hold_s:g} s", figures)
        if not enough:
            if held_s >= cfg.max_hold_s:
                return CanaryDecision("rollback", f"challenger answered {challenger.requests} requests, fewer than "
                                      f"canary.min_requests {cfg.min_requests}, {at}: not enough traffic to judge",
                                      figures)
            return CanaryDecision("hold", f"holding weight {weight:g}: {challenger.requests} of "
                                  f"{cfg.min_requests} challenger requests", figures)
        p99 = "-" if challenger.p99_s is None else f"{challenger.p99_s * 1000:.1f} ms"
        return CanaryDecision("advance", f"challenger within bounds {at}: error rate {challenger.error_rate:.4f} vs "
                              f"{champion.error_rate:.4f}, p99 {p99} vs "
                              f"{'-' if champion.p99_s is None else f'{champion.p99_s * 1000:.1f} ms'}, "
                              f"{challenger.requests} requests", figures)
