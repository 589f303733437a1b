"""Datasets as Ray Datasets: bundled real data, a seeded synthetic generator, CSV/Parquet files.

Every source ends in the same shape: three Ray Datasets (train / validation / test) whose rows hold
``x`` (float32 features, shape ``(F,)``) and ``y`` (int64 class, or a float32 target for regression), plus
the standardisation statistics fitted on the training split only, and a fingerprint recorded with the run.
Labels are checked on the driver before any worker starts: classes must be whole numbers in 0..K-1, a
regression target must be numeric.

Splits are seeded and deterministic. Small bundled data is split in memory; synthetic and file data are
split row by row from a hash (of the row id, or of the row's values), so nothing is collected into the
driver and the same seed always gives the same split.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from mlray.config import DataConfig
from mlray.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SYNTHETIC_VERSION = 1  # bump when the generator changes, so fingerprints change with it


@dataclass(frozen=True)
class DatasetSpec:
    """What the model needs to know about the data, and what the run records about it."""

    name: str
    feature_names: list[str]
    num_classes: int
    mean: list[float]
    std: list[float]
    fingerprint: str
    sizes: dict[str, int] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    task: str = "classification"
    target_mean: list[float] = field(default_factory=list)  # regression: the training split's target statistics
    target_std: list[float] = field(default_factory=list)

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def num_outputs(self) -> int:
        """K: class logits for classification, one value per target for regression."""
        return self.num_classes if self.task == "classification" else len(self.target_mean)


@dataclass(frozen=True)
class PreparedData:
    spec: DatasetSpec
    datasets: dict[str, Any]  # split name -> ray.data.Dataset with columns x, y


def _split_ids(u: np.ndarray, val: float, test: float) -> np.ndarray:
    """Map uniform numbers in [0, 1) to split ids 0 (train), 1 (val), 2 (test)."""
    return np.where(u < test, 2, np.where(u < test + val, 1, 0))


def _hash_uniform(keys: np.ndarray, seed: int) -> np.ndarray:
    """Uniform numbers in [0, 1) from uint64 keys: a seeded splitmix64, the same on every machine."""
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        z = keys.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _bundled(name: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    from sklearn import datasets

    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}[name]
    bunch = loader()
    features = [str(n) for n in bunch.feature_names]
    classes = [str(c) for c in bunch.target_names]
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64), features, classes


def _row_keys(x: np.ndarray) -> np.ndarray:
    """A uint64 key per row from its values, so a file row lands in the same split on every read."""
    words = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)  # (B, F)
    powers = np.uint64(1099511628211) ** np.arange(words.shape[1], dtype=np.uint64)
    with np.errstate(over="ignore"):
        return (words * powers).sum(axis=1, dtype=np.uint64)


def _fingerprint(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def _memory_split(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """A bundled dataset with each row's split id (0 train, 1 val, 2 test) from a seeded generator."""
    x, y, features, classes = _bundled(cfg.source)
    split = _split_ids(np.random.default_rng(seed).random(len(y)), cfg.val_fraction, cfg.test_fraction)
    return x, y, split, features, classes


def _from_memory(cfg: DataConfig, seed: int) -> PreparedData:
    import ray.data

    x, y, split, features, classes = _memory_split(cfg, seed)
    train_x = x[split == 0]
    spec = DatasetSpec(
        name=cfg.source,
        feature_names=features,
        num_classes=len(classes),
        mean=train_x.mean(axis=0).tolist(),
        std=train_x.std(axis=0).tolist(),
        fingerprint=_fingerprint(x.tobytes(), y.tobytes()),
        sizes={name: int((split == i).sum()) for i, name in enumerate(SPLITS)},
        class_names=classes,
    )
    datasets = {
        name: ray.data.from_pandas(pd.DataFrame({"x": list(x[split == i]), "y": y[split == i]}))
        for i, name in enumerate(SPLITS)
    }
    return PreparedData(spec=spec, datasets=datasets)


def synthetic_batch(ids: np.ndarray, *, features: int, classes: int, seed: int) -> dict[str, np.ndarray]:
    """Rows of the synthetic task for the given row ids: the same id always gives the same row.

    Classes are Gaussian blobs around seeded centres, so a model can learn them but not perfectly.
    """
    centres = np.random.default_rng(seed).normal(0.0, 1.0, size=(classes, features))
    y = (_hash_uniform(ids, seed + 1) * classes).astype(np.int64)
    noise = np.random.default_rng([seed, int(ids[0]) if len(ids) else 0]).normal(0.0, 1.5, (len(ids), features))
    x = (centres[y] * 2.0 + noise + 5.0).astype(np.float32)  # offset so standardisation matters
    return {"x": x, "y": y}


def _synthetic(cfg: DataConfig, seed: int) -> PreparedData:
    import ray.data

    syn = cfg.synthetic

    def rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["id"].astype(np.uint64)
        out = synthetic_batch(ids, features=syn.features, classes=syn.classes, seed=seed)
        out["split"] = _split_ids(_hash_uniform(ids, seed), cfg.val_fraction, cfg.test_fraction)
        return out

    base = ray.data.range(syn.rows).map_batches(rows, batch_format="numpy")
    datasets = _filter_splits(base)
    mean, std = _distributed_stats(datasets["train"], syn.features)
    spec = DatasetSpec(
        name="synthetic",
        feature_names=[f"f{i}" for i in range(syn.features)],
        num_classes=syn.classes,
        mean=mean,
        std=std,
        fingerprint=_fingerprint(repr((SYNTHETIC_VERSION, seed, syn.rows, syn.features, syn.classes)).encode()),
        class_names=[str(c) for c in range(syn.classes)],
    )
    return PreparedData(spec=spec, datasets=datasets)


def _filter_splits(base: Any) -> dict[str, Any]:
    def keep(split_id: int):  # type: ignore[no-untyped-def]
        def select(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            mask = batch["split"] == split_id
            return {"x": batch["x"][mask], "y": batch["y"][mask]}

        return select

    return {name: base.map_batches(keep(i), batch_format="numpy") for i, name in enumerate(SPLITS)}


def _distributed_stats(train: Any, num_features: int, *, column: str = "x") -> tuple[list[float], list[float]]:
    """Mean and standard deviation per feature (of ``column``) in one distributed pass (sums per block)."""
    def sums(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = batch[column].astype(np.float64).reshape(len(batch[column]), -1)  # (B, F); a target (B,) -> (B, 1)
        return {"n": np.array([len(x)]), "s": x.sum(axis=0)[None], "ss": (x * x).sum(axis=0)[None]}

    n, s, ss = 0, np.zeros(num_features), np.zeros(num_features)
    for part in train.map_batches(sums, batch_format="numpy", batch_size=None).iter_batches(batch_format="numpy"):
        n += int(part["n"].sum())
        s += part["s"].sum(axis=0)
        ss += part["ss"].sum(axis=0)
    if n == 0:
        raise DataError("the training split is empty: give more rows or a smaller val/test fraction")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    return mean.tolist(), std.tolist()


def _data_files(path: Path) -> list[Path]:
    return sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())


def file_fingerprint(path: Path) -> str:
    """sha256 over each data file's relative name and contents, streamed (no file is read whole)."""
    digest = hashlib.sha256()
    for file in _data_files(path):
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _check_columns(raw: Any, cfg: DataConfig, task: str) -> list[str]:
    """The feature columns; a :class:`DataError` naming the column unless features and label fit the task."""
    import pyarrow as pa

    label = cfg.label_column
    columns = raw.columns()
    if label not in columns:
        raise DataError(f"data.label_column {label!r} is not a column of {cfg.source!r}; columns: {columns}")
    types = dict(zip(raw.schema().names, raw.schema().types, strict=True))

    def numeric(kind: Any) -> bool:
        return isinstance(kind, pa.DataType) and (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                                                  or pa.types.is_boolean(kind))

    features = [c for c in columns if c != label]
    text = [c for c in features if not numeric(types.get(c))]
    if text:
        raise DataError(f"data.source {cfg.source!r}: feature column(s) {text[:5]} are not numeric "
                        f"({types.get(text[0])}); every column but data.label_column is a float32 feature")
    if not numeric(types.get(label)):
        expected = "whole-number class ids 0..K-1" if task == "classification" else "a numeric regression target"
        raise DataError(f"data.label_column {label!r} of {cfg.source!r} holds {types.get(label)} values; "
                        f"task {task!r} needs {expected}")
    return features


def _class_count(raw: Any, cfg: DataConfig) -> int:
    """K from the labels: whole numbers in 0..K-1 (K = data.num_classes, or the largest label + 1)."""
    label = cfg.label_column
    assert label is not None  # DataConfig requires it for a file source
    low, high = float(cast(float, raw.min(label))), float(cast(float, raw.max(label)))

    def fractional(batch: pd.DataFrame) -> pd.DataFrame:
        values = batch[label].to_numpy(dtype=np.float64)
        return pd.DataFrame({"bad": [int((values != np.floor(values)).sum())]})

    bad = int(raw.map_batches(fractional, batch_format="pandas").sum("bad") or 0)
    limit = cfg.num_classes
    if low < 0 or bad or (limit is not None and high > limit - 1):
        where = f"0..{limit - 1}" if limit is not None else "0..K-1 (whole numbers)"
        found = f"{bad} non-integer value(s)" if bad else f"values from {low:g} to {high:g}"
        raise DataError(f"data.label_column {label!r} of {cfg.source!r} has {found}; classification labels must "
                        f"be class ids in {where}. Map the labels to ids first, or set task: regression")
    return limit if limit is not None else int(high) + 1


def _files(cfg: DataConfig, seed: int, task: str) -> PreparedData:
    import ray.data

    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(f"data.source {cfg.source!r} is neither a bundled dataset nor an existing path")
    files = _data_files(path)
    kinds = {p.suffix.lower() for p in files} - {""}
    if kinds <= {".parquet"} and files:
        raw = ray.data.read_parquet(str(path))
    elif kinds <= {".csv"} and files:
        raw = ray.data.read_csv(str(path))
    else:
        raise DataError(f"data.source {cfg.source!r}: expected .csv or .parquet files, found {sorted(kinds)}")
    label = cfg.label_column
    features = _check_columns(raw, cfg, task)
    regression = task == "regression"
    num_classes = 0 if regression else _class_count(raw, cfg)

    def pack(batch: pd.DataFrame) -> dict[str, np.ndarray]:
        x = batch[features].to_numpy(dtype=np.float32)
        return {
            "x": x,
            "y": batch[label].to_numpy(dtype=np.float32 if regression else np.int64),
            "split": _split_ids(_hash_uniform(_row_keys(x), seed), cfg.val_fraction, cfg.test_fraction),
        }

    datasets = _filter_splits(raw.map_batches(pack, batch_format="pandas"))
    mean, std = _distributed_stats(datasets["train"], len(features))
    target_mean, target_std = _distributed_stats(datasets["train"], 1, column="y") if regression else ([], [])
    spec = DatasetSpec(
        name=path.name,
        feature_names=features,
        num_classes=num_classes,
        mean=mean,
        std=std,
        fingerprint=file_fingerprint(path),
        class_names=[str(c) for c in range(num_classes)],
        task=task,
        target_mean=target_mean,
        target_std=target_std,
    )
    return PreparedData(spec=spec, datasets=datasets)


def prepare(cfg: DataConfig, *, seed: int, task: str = "classification") -> PreparedData:
    """Build the three splits and the dataset spec for a config. Needs a connected Ray session."""
    if task != "classification" and cfg.source in ("digits", "breast_cancer", "synthetic"):
        raise DataError(f"data.source {cfg.source!r} is a classification dataset; task {task!r} needs a file")
    if cfg.source in ("digits", "breast_cancer"):
        prepared = _from_memory(cfg, seed)
    elif cfg.source == "synthetic":
        prepared = _synthetic(cfg, seed)
    else:
        prepared = _files(cfg, seed, task)
    if cfg.cache:
        prepared = PreparedData(spec=prepared.spec,
                                datasets={name: ds.materialize() for name, ds in prepared.datasets.items()})
    logger.info(
        "Prepared %s for %s: %d features, %d outputs, splits %s, fingerprint %s",
        prepared.spec.name,
        task,
        prepared.spec.num_features,
        prepared.spec.num_outputs,
        prepared.spec.sizes or "(streamed)",
        prepared.spec.fingerprint[:12],
    )
    return prepared


def sample_test_rows(cfg: DataConfig, *, seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A few rows of a bundled dataset's test split (the same split training used), for demos."""
    if cfg.source not in ("digits", "breast_cancer"):
        raise DataError(f"sample rows are available for bundled datasets, not {cfg.source!r}")
    x, y, split, _, _ = _memory_split(cfg, seed)
    return x[split == 2][:count], y[split == 2][:count]


def local_splits(cfg: DataConfig, *, seed: int, task: str = "classification"
                 ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """The train / val / test rows a training run with this config used, read in this process without Ray,
    and the data's fingerprint (to check it against the run's). For bundled and file data; synthetic rows
    depend on how Ray Data cut them into blocks, so they are only reproducible through :func:`prepare`."""
    if cfg.source in ("digits", "breast_cancer"):
        x, y, split, _, _ = _memory_split(cfg, seed)
        fingerprint = _fingerprint(x.tobytes(), y.tobytes())
    elif cfg.source == "synthetic":
        raise DataError("data.source 'synthetic' cannot be re-read outside Ray: its rows depend on Ray Data's blocks")
    else:
        path = Path(cfg.source).expanduser()
        files = _data_files(path) if path.exists() else []
        if not files:
            raise DataError(f"data.source {cfg.source!r} is not an existing file or folder here")
        reader = pd.read_parquet if files[0].suffix.lower() == ".parquet" else pd.read_csv
        frame = pd.concat([reader(file) for file in files], ignore_index=True)
        label = str(cfg.label_column)
        x = frame[[c for c in frame.columns if c != label]].to_numpy(dtype=np.float32)
        y = frame[label].to_numpy(dtype=np.float32 if task == "regression" else np.int64)
        split = _split_ids(_hash_uniform(_row_keys(x), seed), cfg.val_fraction, cfg.test_fraction)
        fingerprint = file_fingerprint(path)
    return {name: (x[split == i], y[split == i]) for i, name in enumerate(SPLITS)}, fingerprint
