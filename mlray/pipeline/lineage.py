"""Where a model version came from: ``mlray lineage NAME@ALIAS``.

The chain: the version -> (the version it was compressed from) -> its training run -> the data
(name, fingerprint) -> the code (git commit, mlray version, Ray job) -> the pipeline run that shipped it.
Read from the version's tags (:data:`mlray.registry.LINEAGE_TAGS`) and the runs they name.
"""

from __future__ import annotations

from typing import Any

from mlray import registry
from mlray.pipeline.record import OUTCOME_TAG, STEP_TAG
from mlray.registry import tracking


def _run(run_id: str | None) -> dict[str, Any] | None:
    if not run_id:
        return None
    try:
        run = tracking.client().get_run(run_id)
    except Exception:  # noqa: BLE001 - a deleted run: the chain says so instead of failing
        return {"run_id": run_id, "missing": True}
    return {"run_id": run_id, "name": run.info.run_name, "status": run.info.status,
            "experiment_id": run.info.experiment_id, "tags": dict(run.data.tags), "metrics": dict(run.data.metrics)}


def lineage(name: str, *, alias: str | None = None, version: int | None = None) -> dict[str, Any]:
    info = registry.get_version(name, alias=alias, version=version)
    tags = registry.lineage_of(info)
    chain: dict[str, Any] = {"model": name, "version": info.version, "aliases": info.aliases, "tags": tags}
    parent = tags.get("mlray.compressed_from")
    if parent:
        chain["compressed_from"] = int(parent)
        source = registry.get_version(name, version=int(parent))
        tags = {**registry.lineage_of(source), **{k: v for k, v in tags.items() if k.startswith("mlray.pipeline")}}
    training = _run(tags.get("mlray.run_id") or info.run_id)
    chain["training_run"] = None if training is None else {
        "run_id": training["run_id"], "name": training.get("name"), "status": training.get("status"),
        "metrics": {k: v for k, v in training.get("metrics", {}).items() if k.startswith("test_")}}
    chain["data"] = {"name": tags.get("data.name"), "fingerprint": tags.get("data.fingerprint")}
    chain["code"] = {"git_commit": tags.get("git.commit"), "mlray_version": tags.get("mlray.version"),
                     "ray_job_id": tags.get("ray.job_id")}
    pipeline = _run(tags.get("mlray.pipeline.run_id"))
    chain["pipeline"] = None if pipeline is None else {
        "id": tags.get("mlray.pipeline.id"), "run_id": pipeline["run_id"],
        "outcome": pipeline.get("tags", {}).get(OUTCOME_TAG),
        "steps": sorted(k.removeprefix(STEP_TAG) for k in pipeline.get("tags", {}) if k.startswith(STEP_TAG))}
    return chain


def render(chain: dict[str, Any]) -> str:
    """The chain as a few lines for a terminal."""
    lines = [f"{chain['model']} version {chain['version']}"
             + (f"  ({', '.join('@' + a for a in chain['aliases'])})" if chain["aliases"] else "")]
    if "compressed_from" in chain:
        lines.append(f"  compressed from version {chain['compressed_from']}")
    run = chain["training_run"]
    if run:
        metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(run["metrics"].items()))
        lines.append(f"  trained in run {run['run_id']} ({run['status']})  {metrics}".rstrip())
    data, code = chain["data"], chain["code"]
    lines.append(f"  data {data['name'] or '-'}  fingerprint {data['fingerprint'] or '-'}")
    lines.append(f"  code git {code['git_commit'] or '-'}  mlray {code['mlray_version'] or '-'}"
                 + (f"  ray job {code['ray_job_id']}" if code["ray_job_id"] else ""))
    pipeline = chain["pipeline"]
    lines.append(f"  pipeline {pipeline['id']} (run {pipeline['run_id']}, outcome {pipeline['outcome'] or 'running'})"
                 if pipeline else "  pipeline -  (not shipped by a pipeline)")
    return "\n".join(lines)
