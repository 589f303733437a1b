"""Per-role request counters that replicas report to the watcher, and the figures a canary decides on.

Each replica counts, per ``role:version``, the prediction requests it answered, those that failed on the
server's side (a 5xx: the model raised, or ran out of time) and a latency histogram. The counts are
cumulative and ride on the replica's heartbeat (``Follower.report``); the watcher keeps every replica's last
report, so a sum over replicas only grows. A reader (the pipeline's watch step) takes two snapshots and
works on their difference: :func:`window`. Pure Python, no Ray.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

# Upper bounds of the latency buckets, 0.5 ms .. ~33 s in steps of x1.5; one more bucket for anything above.
BOUNDARIES_S: tuple[float, ...] = tuple(round(0.0005 * 1.5**i, 6) for i in range(28))


class TrafficCounter:
    """The counts of one ``role:version`` in one replica."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.buckets = [0] * (len(BOUNDARIES_S) + 1)

    def record(self, seconds: float, *, ok: bool) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        self.buckets[bisect.bisect_left(BOUNDARIES_S, seconds)] += 1

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "buckets": list(self.buckets)}


def merge(reports: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Sum replicas' ``{"role:vN": counts}`` reports key by key."""
    total: dict[str, dict[str, Any]] = {}
    for report in reports:
        for key, counts in report.items():
            into = total.setdefault(key, {"requests": 0, "errors": 0, "buckets": [0] * (len(BOUNDARIES_S) + 1)})
            into["requests"] += counts["requests"]
            into["errors"] += counts["errors"]
            into["buckets"] = [a + b for a, b in zip(into["buckets"], counts["buckets"], strict=True)]
    return total


def quantile(buckets: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the ``q`` quantile (an overestimate by at most one step, x1.5);
    None without requests. The overflow bucket reads as twice the last bound."""
    total = sum(buckets)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            return BOUNDARIES_S[i] if i < len(BOUNDARIES_S) else 2 * BOUNDARIES_S[-1]
    return 2 * BOUNDARIES_S[-1]


@dataclass(frozen=True)
class Window:
    """What one side answered between two snapshots."""

    requests: int
    errors: int
    p99_s: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p99_s": self.p99_s}


def window(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], key: str) -> Window:
    """The requests of ``key`` (``"role:vN"``) between the snapshots ``before`` and ``after``."""
    empty = {"requests": 0, "errors": 0, "buckets": [0] * (len(BOUNDARIES_S) + 1)}
    old, new = before.get(key, empty), after.get(key, empty)
    buckets = [max(0, b - a) for a, b in zip(old["buckets"], new["buckets"], strict=True)]
    return Window(requests=max(0, new["requests"] - old["requests"]), errors=max(0, new["errors"] - old["errors"]),
                  p99_s=quantile(buckets, 0.99))
