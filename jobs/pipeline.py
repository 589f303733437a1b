"""`ray job submit --working-dir . -- python jobs/pipeline.py --config configs/pipeline.yaml [--id ID] [--set K=V]`

Runs (or, with the id of an earlier run, resumes) the gated pipeline on the cluster the job runs on.
"""

from __future__ import annotations

import argparse
import json
import logging

from mlray.pipeline import load_pipeline, plan, run
from mlray.pipeline.config import parse_sets
from mlray.pipeline.runner import new_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="pipeline YAML")
    parser.add_argument("--id", dest="pipeline_id", help="the same id again resumes the pipeline")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    parser.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                        help="override a pipeline field (dotted; the value read as YAML), e.g. canary.hold_s=10")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_pipeline(args.config, overrides=parse_sets(args.sets))
    pipeline_id = args.pipeline_id or new_id()
    if args.dry_run:
        print(json.dumps({"pipeline_id": pipeline_id, "plan": plan(cfg, pipeline_id=pipeline_id)}))
        return
    result = run(cfg, pipeline_id=pipeline_id, progress=print)
    print(json.dumps(result.to_dict(), default=str))
    if result.outcome != "champion":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
