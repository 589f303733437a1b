"""CPU seconds a server's processes spend during a load run, by role: a cost per request that other work
on the machine changes far less than it changes requests per second.

On 2 busy cores, req/s says how much CPU a server got; CPU per request says how much it needs. A server's
processes are the trees under the given pids (wrk, a child of the same driver, is left out). A process that
starts during the run counts from zero; one that ends during it is lost (rare: HAProxy reloads).
"""

from __future__ import annotations

from collections.abc import Callable

import psutil

from bench._serve.listeners import role_of

Sample = dict[int, tuple[str, float]]


def _sample(roots: list[int], role: Callable[[psutil.Process], str]) -> Sample:
    out: Sample = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                if proc.name() == "wrk":
                    continue
                times = proc.cpu_times()
                out[proc.pid] = (role(proc), times.user + times.system)
            except psutil.Error:
                continue
    return out


class CpuMeter:
    """``with CpuMeter([pid]) as meter: ...`` then ``meter.by_role()`` and ``meter.total``."""

    def __init__(self, roots: list[int], *, role: Callable[[psutil.Process], str] = role_of) -> None:
        self.roots, self.role = roots, role
        self.start: Sample = {}
        self.end: Sample = {}

    def __enter__(self) -> CpuMeter:
        self.start = _sample(self.roots, self.role)
        return self

    def __exit__(self, *_: object) -> None:
        self.end = _sample(self.roots, self.role)

    def by_role(self) -> dict[str, float]:
        spent: dict[str, float] = {}
        for pid, (role, cpu) in self.end.items():
            before = self.start.get(pid, (role, 0.0))[1]
            spent[role] = spent.get(role, 0.0) + max(0.0, cpu - before)
        return spent

    @property
    def total(self) -> float:
        return sum(self.by_role().values())
