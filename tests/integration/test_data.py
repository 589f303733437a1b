"""File and synthetic sources through Ray Data: deterministic splits, stats from a distributed pass,
nothing collected into the driver."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlray.config import DataConfig
from mlray.errors import DataError
from mlray.training.data import file_fingerprint, prepare

pytestmark = pytest.mark.integration


def _collect(ds) -> tuple[np.ndarray, np.ndarray]:
    rows = ds.take_all()
    return np.stack([r["x"] for r in rows]), np.array([r["y"] for r in rows])


def test_parquet_folder_splits_are_deterministic_and_stats_fit_train_only(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "parquet"
    folder.mkdir()
    frames = []
    for part in range(3):
        frame = pd.DataFrame(rng.normal(loc=3.0, size=(400, 5)), columns=[f"c{i}" for i in range(5)])
        frame["target"] = rng.integers(0, 3, 400)
        frame.to_parquet(folder / f"part-{part}.parquet")
        frames.append(frame)
    cfg = DataConfig(source=str(folder), label_column="target")

    prepared = prepare(cfg, seed=7)
    collected = {name: _collect(prepared.datasets[name]) for name in ("train", "val", "test")}
    sizes = {name: len(y) for name, (_, y) in collected.items()}
    assert sum(sizes.values()) == 1200
    assert 0.1 < sizes["test"] / 1200 < 0.2 and 0.1 < sizes["val"] / 1200 < 0.2
    # a second read of the same files puts every row in the same split
    again, _ = _collect(prepared.datasets["test"])
    test_x = collected["test"][0]
    assert np.array_equal(test_x[np.lexsort(test_x.T)], again[np.lexsort(again.T)])

    train_x = collected["train"][0]
    np.testing.assert_allclose(prepared.spec.mean, train_x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(prepared.spec.std, train_x.std(0), rtol=1e-4)
    assert prepared.spec.feature_names == [f"c{i}" for i in range(5)] and prepared.spec.num_classes == 3

    before = file_fingerprint(folder)
    assert prepared.spec.fingerprint == before
    frames[0].iloc[:1].to_parquet(folder / "part-9.parquet")
    assert file_fingerprint(folder) != before  # new file, new fingerprint


def test_synthetic_source_streams_rows(ray_session):
    from mlray.config import SyntheticConfig

    cfg = DataConfig(source="synthetic", synthetic=SyntheticConfig(rows=2000, features=6, classes=4))
    prepared = prepare(cfg, seed=1)
    train, test = prepared.datasets["train"].count(), prepared.datasets["test"].count()
    assert 1200 < train < 1600 and 200 < test < 400
    assert prepared.spec.num_features == 6 and prepared.spec.num_classes == 4
    assert all(abs(m - 5.0) < 1.5 for m in prepared.spec.mean)  # the generator's +5 offset is what gets removed


def test_bad_file_sources_are_named(ray_session, tmp_path):
    with pytest.raises(DataError, match="neither a bundled dataset nor an existing path"):
        prepare(DataConfig(source=str(tmp_path / "missing"), label_column="y"), seed=0)
    (tmp_path / "f.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"label_column 'y' is not a column .* columns: \['a', 'b'\]"):
        prepare(DataConfig(source=str(tmp_path / "f.csv"), label_column="y"), seed=0)
