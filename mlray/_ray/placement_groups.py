"""Placement groups whose creator died, and a restored Tuner's run config (written for Ray 2.60.0).

Ray frees a (non-detached) placement group only once its creator actor *and* its job are gone. When Tune
stops a trial (ASHA), the trial's Train controller is killed but the job - the sweep's driver - lives on,
so the group of the trial's workers keeps its CPUs. Ray Train's own ``PlacementGroupCleaner`` notices the
dead controller through the State API, which needs the dashboard; without one the next trial can wait for
CPUs forever. The public ``placement_group_table()`` leaves out the creator's fields, so they are read
from the GCS records here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mlray._ray import check_version

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrphanedGroup:
    placement_group_id: str
    creator_actor_id: str
    bundles: list[dict[str, float]]


def orphaned_placement_groups(job_id: str) -> list[OrphanedGroup]:
    """Live, non-detached placement groups of job ``job_id`` whose creating actor is dead."""
    import ray
    from ray.core.generated import gcs_pb2

    check_version("placement-group janitor")
    accessor = ray._private.state.state._connect_and_get_accessor()
    table: Any = gcs_pb2.PlacementGroupTableData  # type: ignore[attr-defined]  # generated, no stubs
    live = (table.CREATED, table.PENDING, table.RESCHEDULING)
    found = []
    for raw in accessor.get_placement_group_table():
        record = table.FromString(raw)
        if (record.state in live and not record.is_detached and record.creator_actor_dead
                and record.creator_job_id.hex() == job_id and record.creator_actor_id.strip(b"\xff")):
            found.append(OrphanedGroup(record.placement_group_id.hex(), record.creator_actor_id.hex(),
                                       [dict(b.unit_resources) for b in record.bundles]))
    return found


def restored_run_config(tuner: Any) -> Any:
    """The ``RunConfig`` a ``Tuner.restore`` brought back from the sweep's saved state (callbacks included);
    Tuner has no public getter for it."""
    check_version("restored Tuner run config")
    return tuner._local_tuner.get_run_config()
