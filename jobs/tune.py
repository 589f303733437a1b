"""`ray job submit --working-dir . -- python jobs/tune.py --config configs/digits-tune.yaml [--sweep-name S]`

Runs (or, with the name of an interrupted sweep, resumes) a Ray Tune sweep; registers the best model.
"""

from __future__ import annotations

import argparse
import json
import logging

from mlray.config import load_config
from mlray.training.tune import sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML job config with a 'tune' section")
    parser.add_argument("--sweep-name", help="tune.sweep_name: run again with it to resume an interrupted sweep")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--num-samples", type=int, help="override tune.num_samples")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, overrides={"tune.sweep_name": args.sweep_name, "train.epochs": args.epochs,
                                              "tune.num_samples": args.num_samples})
    result = sweep(cfg)
    print(json.dumps({"sweep": result.sweep_name, "parent_run_id": result.parent_run_id,
                      "best_run_id": result.best_run_id, "best_metric": result.best_metric,
                      "version": result.version, "trials": result.trials}))


if __name__ == "__main__":
    main()
