"""Lowering the priority of this node's Ray metrics agent (opt-in; written for Ray 2.60.0).

The agent (nice 0) takes in the metrics of its node's Ray processes every 10 s and replays each histogram
observation in Python: under load a ~1 s burst on one core every 10 s, above the replicas, which Ray runs
at nice 15 (bench/README.md). Only the agent of the node the caller runs on is touched: the child of the
caller's own raylet, never another cluster's agent on the same machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from mlray._ray import check_version

logger = logging.getLogger(__name__)

AGENT_TITLE = "ray::DashboardAgent"  # the process title Ray's agent sets; its script when setproctitle is missing
AGENT_SCRIPT = "ray/dashboard/agent.py"


def is_metrics_agent(cmdline: list[str]) -> bool:
    """Ray's dashboard agent itself, by its own title or script, never a process that names it in an
    argument: the raylet's command line carries the agent's whole command."""
    if not cmdline:
        return False
    if cmdline[0].startswith(AGENT_TITLE):
        return True
    return "python" in Path(cmdline[0]).name and any(arg.endswith(AGENT_SCRIPT) for arg in cmdline[1:3])


def is_raylet(cmdline: list[str]) -> bool:
    return bool(cmdline) and Path(cmdline[0].split()[0]).name == "raylet"


def own_raylet(pid: int | None = None) -> Any:
    """The raylet that started process ``pid`` (this one by default): a Ray worker's parent, or None."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for parent in psutil.Process(pid).parents():
            with contextlib.suppress(psutil.Error):
                if is_raylet(parent.cmdline()):
                    return parent
    return None


def own_metrics_agents(pid: int | None = None) -> list[Any]:
    """The metrics agent(s) started by the raylet of the node that process ``pid`` runs on."""
    import psutil

    raylet = own_raylet(pid)
    if raylet is None:
        return []
    agents = []
    for child in raylet.children():
        with contextlib.suppress(psutil.Error):
            if is_metrics_agent(child.cmdline()):
                agents.append(child)
    return agents


def lower_metrics_agent_priority(nice: int) -> list[int]:
    """Every thread of this node's metrics agent to ``nice``; returns the agents' pids.

    Linux keeps a nice level per thread, so each thread is set; threads it starts later inherit it.
    Lowering a priority needs no privilege. Warns when no agent is found (Ray changed how it starts it).
    """
    import psutil

    check_version("metrics agent renice")
    agents = own_metrics_agents()
    if not agents:
        logger.warning("metrics_agent_nice: found no Ray metrics agent under this process's raylet "
                       "(Ray's process layout changed?); its priority stays as Ray set it (mlray/_ray/agent.py)")
    lowered = []
    for proc in agents:
        try:
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                with contextlib.suppress(ProcessLookupError):
                    if os.getpriority(os.PRIO_PROCESS, int(tid)) < nice:
                        os.setpriority(os.PRIO_PROCESS, int(tid), nice)
            lowered.append(proc.pid)
        except (psutil.Error, FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
        except PermissionError as err:  # a sandbox that forbids setpriority: serve on, at Ray's levels
            logger.warning("Could not lower the priority of Ray's metrics agent (pid %d): %s", proc.pid, err)
    return lowered
