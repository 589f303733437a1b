"""`ray job submit --working-dir . -- python jobs/train.py --config configs/digits.yaml`

Trains, records and registers a new model version on the cluster the job runs on.
"""

from __future__ import annotations

import argparse
import json
import logging

from mlray.config import load_config
from mlray.training.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML job config")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--workers", type=int, help="override train.num_workers")
    parser.add_argument("--name", help="override the registered model name")
    parser.add_argument("--run-name", help="train.run_name: run the same command again to continue a killed run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, overrides={"train.epochs": args.epochs, "train.num_workers": args.workers,
                                              "name": args.name, "train.run_name": args.run_name})
    result = train(cfg)
    print(json.dumps({"run_id": result.run_id, "model": result.model_name, "version": result.version,
                      "metrics": result.metrics}))


if __name__ == "__main__":
    main()
