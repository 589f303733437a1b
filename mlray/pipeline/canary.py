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
    (at any time: a model that raises must not wait for the hold to end), or, once each side answered
    ``min_p99_requests``, when its p99 exceeds ``max_p99_ratio`` x the champion's + ``p99_slack_s``. With
    fewer requests a p99 is the single slowest one, and one pause of a loaded machine would roll back a good
    challenger. It advances after ``hold_s`` with ``min_requests`` answered within bounds; the last weight,
    whose advance is the promotion, also needs its p99 judged. A step still short of what it needs after
    ``max_hold_s`` is rolled back (not enough traffic to judge).
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
        judged = min(challenger.requests, champion.requests) >= cfg.min_p99_requests
        if judged and challenger.p99_s is not None and champion.p99_s is not None:
            limit = cfg.max_p99_ratio * champion.p99_s + cfg.p99_slack_s
            if challenger.p99_s > limit:
                return CanaryDecision("rollback", f"challenger p99 {challenger.p99_s * 1000:.1f} ms exceeds "
                                      f"{cfg.max_p99_ratio:g} x the champion's {champion.p99_s * 1000:.1f} ms + "
                                      f"{cfg.p99_slack_s * 1000:.0f} ms {at}", figures)
        if held_s < cfg.hold_s:
            return CanaryDecision("hold", f"holding weight {weight:g}: {held_s:.0f} of {cfg.hold_s:g} s", figures)
        short = self._short(weight, champion, challenger, judged)
        if short:
            if held_s >= cfg.max_hold_s:
                return CanaryDecision("rollback", f"{short} after {held_s:.0f} s at weight {weight:g} "
                                      f"(canary.max_hold_s {cfg.max_hold_s:g}): not enough traffic to judge",
                                      figures)
            return CanaryDecision("hold", f"holding weight {weight:g}: {short}", figures)
        p99 = "-" if challenger.p99_s is None else f"{challenger.p99_s * 1000:.1f} ms"
        return CanaryDecision("advance", f"challenger within bounds {at}: error rate {challenger.error_rate:.4f} vs "
                              f"{champion.error_rate:.4f}, p99 {p99} vs "
                              f"{'-' if champion.p99_s is None else f'{champion.p99_s * 1000:.1f} ms'}, "
                              f"{challenger.requests} requests"
                              + ("" if judged else f" (p99s not compared: fewer than {cfg.min_p99_requests} "
                                 "requests a side)"), figures)

    def _short(self, weight: float, champion: Window, challenger: Window, judged: bool) -> str:
        """What the step still lacks before it may advance, or '' when nothing."""
        cfg = self.config
        if challenger.requests < cfg.min_requests:
            return f"{challenger.requests} of canary.min_requests {cfg.min_requests} challenger requests"
        if weight >= cfg.weights[-1] and not judged:
            return (f"the promotion needs the p99s compared: {challenger.requests} challenger and "
                    f"{champion.requests} champion requests of canary.min_p99_requests {cfg.min_p99_requests} each")
        return ""
