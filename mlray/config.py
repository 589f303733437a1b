"""Typed job configs: one YAML file per job, CLI flags override single fields.

The YAML comes from users, so it is checked with pydantic: an unknown or misspelled field, or a value of
the wrong type or range, fails with the field's dotted path, the value given and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlray.errors import ConfigError

BUNDLED_DATASETS = ("digits", "breast_cancer", "synthetic")
# model.arch shorthands for the built-in factories
BUILTIN_FACTORIES = {"mlp": "mlray.models:mlp", "cnn": "mlray.models:cnn"}
BUILTIN_ARCHS = tuple(BUILTIN_FACTORIES)
# The metrics each task records (val_*, test_*, final_*) and the direction in which each is better.
TASK_METRICS: dict[str, dict[str, str]] = {
    "classification": {"accuracy": "maximize", "loss": "minimize"},
    "regression": {"rmse": "minimize", "mae": "minimize", "r2": "maximize", "loss": "minimize"},
}
LOSSES = {"classification": ("cross_entropy",), "regression": ("mse", "l1", "huber")}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(_Strict):
    rows: int = Field(default=10_000, ge=10)
    features: int = Field(default=16, ge=1)
    classes: int = Field(default=2, ge=2)


class DataConfig(_Strict):
    source: str = Field(
        default="digits", description="digits | breast_cancer | synthetic | a CSV/Parquet file or folder"
    )
    label_column: str | None = Field(default=None, description="label column of a CSV/Parquet source")
    num_classes: int | None = Field(
        default=None, ge=2,
        description="classification from a file: labels must be 0..num_classes-1 (default: largest label + 1)",
    )
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    synthetic: SyntheticConfig = SyntheticConfig()
    cache: bool = Field(
        default=False,
        description="materialize the prepared splits in Ray's object store once, instead of re-reading "
        "(or re-generating) them every epoch; for data that fits in the cluster's object store",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source not in BUNDLED_DATASETS and not self.label_column:
            raise ValueError(
                f"data.label_column is required for a file source ({self.source!r}); "
                f"bundled sources are {', '.join(BUNDLED_DATASETS)}"
            )
        if self.source in BUNDLED_DATASETS and self.num_classes is not None:
            raise ValueError(f"data.num_classes applies to a file source; {self.source!r} knows its classes")
        return self


class ModelConfig(_Strict):
    """The built-in ``arch`` (with ``hidden`` and ``dropout``), or a ``factory`` of your own with ``kwargs``."""

    arch: str = "mlp"
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    factory: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$",
        description="'package.module:function' called as function(num_features=F, num_outputs=K, **kwargs)",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for model.factory")

    @field_validator("hidden")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(width < 1 for width in value):
            raise ValueError(f"every hidden width must be a positive integer, got {list(value)}")
        return value

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in BUILTIN_ARCHS:
            raise ValueError(f"model.arch {value!r} is not known; choose one of {list(BUILTIN_ARCHS)}, "
                             "or name your own with model.factory: 'package.module:function'")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ModelConfig:
        if self.factory is not None:
            builtin_only = sorted({"arch", "hidden", "dropout"} & self.model_fields_set)
            if builtin_only:
                raise ValueError(f"model.{builtin_only[0]} applies to the built-in architectures; with "
                                 f"model.factory {self.factory!r} pass the factory's options in model.kwargs")
        elif self.kwargs:
            raise ValueError("model.kwargs needs model.factory; the built-ins take model.hidden and model.dropout")
        return self

    @property
    def factory_path(self) -> str:
        return self.factory or BUILTIN_FACTORIES[self.arch]

    @property
    def factory_kwargs(self) -> dict[str, Any]:
        if self.factory is not None:
            return dict(self.kwargs)
        return {"hidden": list(self.hidden), "dropout": self.dropout}


class TrainConfig(_Strict):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    epochs: int = Field(default=15, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_failures: int = Field(default=0, ge=-1, description="restarts after worker/node loss; -1 = no limit")
    storage_path: str | None = Field(
        default=None,
        description="Train checkpoint storage; default <home>/checkpoints. On several nodes: shared (s3://, NFS)",
    )
    checkpoints_to_keep: int = Field(default=2, ge=1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    loss: Literal["cross_entropy", "mse", "l1", "huber"] | None = Field(
        default=None, description="default: cross_entropy for classification, mse for regression"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="mixed precision: bf16 autocast, or fp16 autocast with a gradient scaler"
    )
    run_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="re-running with the same name continues that run from its checkpoints",
    )


class GateConfig(_Strict):
    metric: str = "test_accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"
    min_improvement: float = Field(default=0.0, ge=0)


class RegistryConfig(_Strict):
    gate: GateConfig = GateConfig()


class SchedulerConfig(_Strict):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(default=2, ge=1, description="epochs every trial runs before ASHA may stop it")
    reduction_factor: float = Field(default=2.0, gt=1)


class TuneSettings(_Strict):
    """A hyperparameter sweep: each trial is a distributed training of the job config with its
    ``search_space`` values applied (dotted field paths)."""

    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(default=4, ge=1)
    max_concurrent_trials: int = Field(default=1, ge=1)
    sweep_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    scheduler: SchedulerConfig = SchedulerConfig()
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("search_space")
    @classmethod
    def _known_samplers(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for path, spec in value.items():
            if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise ValueError(f"search_space.{path} must be one of {{{', '.join(SAMPLERS)}}}: [...], got {spec}")
        return value


SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")


class JobConfig(_Strict):
    name: str = Field(default="digits", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="registered model name")
    experiment: str | None = None
    seed: int = 42
    task: Literal["classification", "regression"] = "classification"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    registry: RegistryConfig = RegistryConfig()
    tune: TuneSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _regression_gate(cls, data: Any) -> Any:
        """A regression job without a gate of its own gates on test_rmse (lower is better)."""
        if isinstance(data, dict) and data.get("task") == "regression":
            registry = data.get("registry") or {}
            if isinstance(registry, dict) and "gate" not in registry:
                data = {**data, "registry": {**registry, "gate": {"metric": "test_rmse", "direction": "minimize"}}}
        return data

    @model_validator(mode="after")
    def _fits_task(self) -> JobConfig:
        task = self.task
        if task == "regression" and self.data.source in BUNDLED_DATASETS:
            raise ValueError(f"task 'regression' needs a CSV/Parquet data.source with a numeric "
                             f"data.label_column; {self.data.source!r} is a classification dataset")
        if task == "regression" and self.data.num_classes is not None:
            raise ValueError("data.num_classes applies to classification, not task 'regression'")
        if self.train.loss is not None and self.train.loss not in LOSSES[task]:
            raise ValueError(f"train.loss {self.train.loss!r} does not fit task {task!r}; choose one of "
                             f"{list(LOSSES[task])}")
        gate = self.registry.gate
        _check_metric(task, "registry.gate", gate.metric, "direction", gate.direction, prefix="test")
        if self.tune is not None:
            mode = {"max": "maximize", "min": "minimize"}[self.tune.mode]
            _check_metric(task, "tune", self.tune.metric, "mode", mode, prefix="val")
        return self

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    @property
    def loss(self) -> str:
        return self.train.loss or LOSSES[self.task][0]


def _check_metric(task: str, section: str, metric: str, field: str, direction: str, *, prefix: str) -> None:
    """A metric the task records, optimised in the direction in which it gets better."""
    kind = metric.rsplit("_", 1)[-1]
    other = [name for t, names in TASK_METRICS.items() if t != task for name in names]
    if kind not in TASK_METRICS[task] and kind in other:
        raise ValueError(f"{section}.metric {metric!r} is not recorded for task {task!r}; "
                         f"choose {prefix}_<{'|'.join(TASK_METRICS[task])}>")
    better = TASK_METRICS[task].get(kind)
    if better is not None and direction != better:
        shown = direction if field == "direction" else direction[:3]
        wanted = better if field == "direction" else better[:3]
        raise ValueError(f"{section}.{field} {shown!r} is wrong for {metric!r}: {kind} is better when it goes "
                         f"{'up' if better == 'maximize' else 'down'} ({field}: {wanted})")


def _format_error(err: ValidationError, origin: str) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{where}: {item['msg']}{shown}")
    return f"invalid config {origin}:\n  " + "\n  ".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def parse_config(raw: dict[str, Any], *, overrides: dict[str, Any] | None = None, origin: str = "") -> JobConfig:
    """Validate a config tree; ``overrides`` maps dotted field paths (``train.epochs``) to values."""
    tree = dict(raw)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


def load_config(path: str | Path | None, *, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read a YAML job config (or the defaults when ``path`` is None) and apply CLI overrides."""
    if path is None:
        return parse_config({}, overrides=overrides, origin="(defaults)")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {str(file)!r} does not exist")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(file)!r} must hold a mapping, got {type(raw).__name__}")
    return parse_config(raw, overrides=overrides, origin=f"in {file}")
