"""A model trained in this process and registered as ``mlray train`` would, for compression tests and bench.

Training runs the worker's own step (:func:`mlray.training.loop.train_epoch`) on the splits a job with that config
uses (:func:`mlray.training.data.local_splits`), and the MLflow run gets the params and data tags a training run logs,
so that ``mlray.compress`` finds the parent's test split exactly as it would for a version trained on Ray.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch


def train_and_register(name: str, *, model: dict[str, Any], epochs: int = 8, lr: float = 3e-3, seed: int = 42,
                       data: dict[str, Any] | None = None, task: str = "classification") -> int:
    """Train ``model`` (a job config's ``model`` section) on ``data`` (default digits); returns the version."""
    from mlflow.entities import Param

    from mlray.artifact import ARTIFACT_KEY, write_model_dir
    from mlray.config import parse_config
    from mlray.models import ModelSpec, build
    from mlray.registry import register, tracking
    from mlray.training.data import local_splits
    from mlray.training.loop import train_epoch
    from mlray.training.run import flat_params

    cfg = parse_config({"name": name, "seed": seed, "task": task, "data": data or {"source": "digits"},
                        "model": model, "train": {"epochs": epochs, "lr": lr}})
    rows, fingerprint = local_splits(cfg.data, seed=cfg.seed, task=task)
    x, y = (torch.from_numpy(a) for a in rows["train"])
    regression = task == "regression"
    outputs = 1 if regression else int(max(int(part[1].max()) for part in rows.values())) + 1
    spec = ModelSpec(factory=cfg.model.factory_path, num_features=x.shape[1], num_outputs=outputs,
                     kwargs=cfg.model.factory_kwargs, task=task)
    torch.manual_seed(seed)
    net = build(spec)
    net.standardize.fit(x.mean(0).tolist(), x.std(0, unbiased=False).tolist())
    if net.target is not None:
        net.target.fit([float(y.mean())], [float(y.std(unbiased=False))])
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        train_epoch(net, optimizer, [(x[order[i : i + 64]], y[order[i : i + 64]]) for i in range(0, len(y), 64)],
                    task=task, loss=cfg.loss)

    client = tracking.client()
    tags = {"data.fingerprint": fingerprint, "data.name": Path(cfg.data.source).name}
    run_id = client.create_run(tracking.experiment_id(cfg.experiment_name), tags=tags).info.run_id
    params = flat_params(cfg.model_dump(mode="json"))  # as TrainingRun.log_params, with the data's own figures
    params.update({"data.num_features": str(x.shape[1]), "data.num_classes": str(0 if regression else outputs)})
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    features = [f"pixel_{i}" for i in range(x.shape[1])]
    classes = [] if regression else [str(c) for c in range(outputs)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ARTIFACT_KEY
        meta = write_model_dir(folder, model=net, feature_names=features, class_names=classes,
                               extra={"run_id": run_id, "data": tags["data.name"]})
        uri = tracking.log_model(run_id, folder, feature_names=features, example=rows["test"][0][:2])
    client.set_terminated(run_id, "FINISHED")
    return register(name, model_uri=uri, run_id=run_id,
                    tags={**tags, "mlray.weights_sha256": meta["weights_sha256"], "mlray.run_id": run_id}).version
