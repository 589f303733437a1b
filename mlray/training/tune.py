"""Hyperparameter sweeps on Ray Tune, each trial a distributed training on Ray Train.

One MLflow parent run per sweep, a nested child run per trial (``mlflow.parentRunId``), ASHA early
stopping on the per-epoch metric, a concurrency limit, and only the best trial's model registered,
tagged with the sweep. A sweep interrupted with its driver is resumed by running the same command with
the same ``tune.sweep_name``: Tune restores the finished trials instead of re-running them, and an
unfinished trial's training continues from its Train checkpoints in its own child run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mlray import cluster, settings
from mlray.config import JobConfig, TuneSettings, parse_config
from mlray.errors import ConfigError, TrainingFailed
from mlray.registry import tracking

logger = logging.getLogger(__name__)

SWEEP_TAG = "mlray.sweep_name"
TRIAL_TAG = "mlray.trial_id"


@dataclass(frozen=True)
class SweepResult:
    sweep_name: str
    parent_run_id: str
    best_run_id: str
    best_config: dict[str, Any]
    best_metric: float
    version: int
    trials: int


def search_space(settings_: TuneSettings) -> dict[str, Any]:
    """YAML sampler specs -> Ray Tune sampling objects, keyed by dotted config path."""
    from ray import tune

    samplers = {
        "choice": lambda v: tune.choice(v), "grid": lambda v: tune.grid_search(v),
        "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {path: samplers[kind](values) for path, spec in settings_.search_space.items()
            for kind, values in spec.items()}


def _trial(params: dict[str, Any], *, base: dict[str, Any], parent_run_id: str, experiment_id: str,
           sweep_name: str) -> None:
    """One trial (runs in a Tune trial actor): a training of the base config with ``params`` applied."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mlray.training.run import MODEL_URI_TAG, TrainingRun, runs_named

    trial_id = tune.get_context().get_trial_id()
    run_name = f"{sweep_name}-{trial_id}"
    # A trial that finished just before the sweep's driver died may not be in Tune's saved state yet, so
    # the resumed sweep starts it again. Its run already holds its model: report what it recorded.
    done = [run for run in runs_named(experiment_id, run_name)
            if run.info.status == "FINISHED" and MODEL_URI_TAG in run.data.tags]
    if done:
        logger.info("Trial %s already finished as run %s; reporting its recorded metrics", trial_id,
                    done[0].info.run_id)
        tune.report(dict(done[0].data.metrics))
        return
    overrides = {**params, "train.run_name": run_name}
    cfg = parse_config(base, overrides=overrides, origin=f"(trial {trial_id})")
    run = TrainingRun.open(cfg, experiment_id=experiment_id, mlflow_run_name=trial_id, parent_run_id=parent_run_id,
                           tags={**tracking.lineage_tags(), SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id})
    with run.failing():
        run.log_params(extra={f"trial.{k}": v for k, v in params.items()})
        final, state = run.fit(callbacks=[TuneReportCallback()])
        run.record(final, state)
        run.finish()


def _warn_without_state_api() -> None:
    """Ray Train removes a stopped trial's placement group once it sees, through the State API, that the trial's
    controller died; the State API is served by the dashboard. Without it an ASHA-stopped trial keeps its
    CPUs until the sweep ends, and a later trial may wait for them."""
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, raise_on_missing_output=False)
    except Exception as err:  # noqa: BLE001 - any failure means the cleaner cannot ask either
        logger.warning("This Ray cluster answers no State API (%s): Ray Train cannot release the CPUs of trials "
                       "ASHA stops until the sweep ends. Start the head with its dashboard (the default of "
                       "`ray start --head`, `mlray quickstart` and `ray up`).", err)


def _parent_run(cfg: JobConfig, sweep_name: str, experiment_id: str) -> str:
    mlflow_client = tracking.client()
    found = mlflow_client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep_name}' "
                                      "and tags.`mlray.role` = 'sweep'")
    if found:
        if found[0].info.status == "FINISHED":
            raise ConfigError(f"tune.sweep_name {sweep_name!r} already finished (run {found[0].info.run_id}); "
                              "choose a new name")
        mlflow_client.update_run(found[0].info.run_id, status="RUNNING")
        return str(found[0].info.run_id)
    run = mlflow_client.create_run(experiment_id, run_name=sweep_name, tags={
        **tracking.lineage_tags(), SWEEP_TAG: sweep_name, "mlray.role": "sweep"})
    assert cfg.tune is not None
    for key, value in {"tune.metric": cfg.tune.metric, "tune.mode": cfg.tune.mode,
                       "tune.num_samples": cfg.tune.num_samples,
                       "tune.search_space": cfg.tune.search_space}.items():
        mlflow_client.log_param(run.info.run_id, key, str(value))
    return str(run.info.run_id)


def sweep(cfg: JobConfig, *, address: str | None = None) -> SweepResult:
    """Run (or resume) the sweep in ``cfg.tune``; registers the best trial's model."""
    from ray import tune

    from mlray.registry import register

    if cfg.tune is None:
        raise ConfigError("the config has no 'tune' section: add tune.search_space and friends")
    settings_ = cfg.tune
    cluster.apply_env()
    cluster.connect(address)
    _warn_without_state_api()
    sweep_name = settings_.sweep_name or f"{cfg.name}-sweep-{tracking.new_suffix()}"
    experiment_id = tracking.experiment_id(cfg.experiment_name)
    parent = _parent_run(cfg, sweep_name, experiment_id)
    base = cfg.model_dump(mode="json", exclude={"tune"})
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, parent_run_id=parent, experiment_id=experiment_id,
                             sweep_name=sweep_name),
        {"cpu": 0.01},  # the trial only drives (Ray refuses an empty request); its Train workers hold the CPUs
    )
    storage = cfg.train.storage_path or str(settings.checkpoint_root())
    path = f"{storage.rstrip('/')}/{sweep_name}"
    try:
        if tune.Tuner.can_restore(path):
            logger.info("Resuming sweep %s from %s", sweep_name, path)
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, restart_errored=True)
        else:
            scheduler = (tune.schedulers.ASHAScheduler(grace_period=settings_.scheduler.grace_period,
                                                       reduction_factor=settings_.scheduler.reduction_factor,
                                                       # one past the last epoch: ASHA must never stop a
                                                       # trial at its final report, before it logs its model
                                                       max_t=cfg.train.epochs + 1, time_attr="training_iteration")
                         if settings_.scheduler.type == "asha" else None)
            tuner = tune.Tuner(
                trainable, param_space=search_space(settings_),
                tune_config=tune.TuneConfig(metric=settings_.metric, mode=settings_.mode,
                                            num_samples=settings_.num_samples, scheduler=scheduler,
                                            max_concurrent_trials=settings_.max_concurrent_trials),
                run_config=tune.RunConfig(name=sweep_name, storage_path=storage),
            )
        grid = tuner.fit()
        result = _register_best(cfg, grid, sweep_name, parent, experiment_id, register)
        tracking.client().set_terminated(parent, "FINISHED")
        return result
    except BaseException as err:
        tracking.client().set_terminated(parent, "FAILED")
        if isinstance(err, Exception) and not isinstance(err, (TrainingFailed, ConfigError)):
            raise TrainingFailed(f"sweep {sweep_name!r} failed: {err}") from err
        raise


def _register_best(cfg: JobConfig, grid: Any, sweep_name: str, parent: str, experiment_id: str,
                   register: Any) -> SweepResult:
    from mlray.training.train import MODEL_URI_TAG

    assert cfg.tune is not None
    metric = cfg.tune.metric
    mlflow_client = tracking.client()
    children = {run.data.tags.get(TRIAL_TAG): run for run in mlflow_client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")}
    # Trials ASHA stopped early end without a model; mark their runs so none stays RUNNING.
    for run in children.values():
        if run.info.status == "RUNNING":
            mlflow_client.set_tag(run.info.run_id, "mlray.stopped_by", "ASHA early stopping")
            mlflow_client.set_terminated(run.info.run_id, "KILLED")
    # The best trial is chosen from what MLflow recorded, the same record users compare in its UI: Tune's
    # own results can lag behind it for a trial that finished just before an interrupted sweep's driver died.
    finished = [run for run in children.values() if run.info.status == "FINISHED"
                and MODEL_URI_TAG in run.data.tags and metric in run.data.metrics]
    if not finished:
        raise TrainingFailed(f"sweep {sweep_name!r}: no trial finished with a model")
    sign = 1 if cfg.tune.mode == "max" else -1
    best_run = max(finished, key=lambda run: sign * float(run.data.metrics[metric]))
    best_trial = best_run.data.tags[TRIAL_TAG]
    best_metric = float(best_run.data.metrics[metric])
    configs = {r.metrics["trial_id"]: dict(r.config) for r in grid if r.metrics and "trial_id" in r.metrics}
    best_config = configs.get(best_trial) or {key.removeprefix("trial."): value
                                              for key, value in best_run.data.params.items()
                                              if key.startswith("trial.")}
    version = register(cfg.name, model_uri=best_run.data.tags[MODEL_URI_TAG], run_id=best_run.info.run_id, tags={
        **tracking.lineage_tags(), SWEEP_TAG: sweep_name, "mlray.sweep_parent_run_id": parent,
        TRIAL_TAG: best_trial, "mlray.weights_sha256": best_run.data.tags["mlray.weights_sha256"],
        "data.fingerprint": best_run.data.tags.get("data.fingerprint", ""), "mlray.run_id": best_run.info.run_id,
    })
    mlflow_client.set_tag(parent, "mlray.best_run_id", best_run.info.run_id)
    mlflow_client.log_metric(parent, f"best_{metric}", best_metric)
    return SweepResult(sweep_name=sweep_name, parent_run_id=parent, best_run_id=best_run.info.run_id,
                       best_config=best_config, best_metric=best_metric,
                       version=version.version, trials=len(grid))
