import numpy as np

from mlray.config import DataConfig
from mlray.training.data import _hash_uniform, _row_keys, _split_ids, sample_test_rows, synthetic_batch


def test_split_fractions_and_determinism():
    u = _hash_uniform(np.arange(100_000, dtype=np.uint64), seed=3)
    ids = _split_ids(u, 0.15, 0.15)
    shares = np.bincount(ids) / len(ids)
    assert abs(shares[1] - 0.15) < 0.01 and abs(shares[2] - 0.15) < 0.01
    assert np.array_equal(ids, _split_ids(_hash_uniform(np.arange(100_000, dtype=np.uint64), seed=3), 0.15, 0.15))
    assert not np.array_equal(ids, _split_ids(_hash_uniform(np.arange(100_000, dtype=np.uint64), seed=4), 0.15, 0.15))


def test_row_keys_depend_on_values_not_position():
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    keys = _row_keys(x)
    assert np.array_equal(_row_keys(x[::-1]), keys[::-1])
    assert len(set(keys.tolist())) == 50


def test_synthetic_rows_are_a_function_of_id_and_seed():
    ids = np.arange(10, 20, dtype=np.uint64)
    a = synthetic_batch(ids, features=5, classes=3, seed=1)
    b = synthetic_batch(ids, features=5, classes=3, seed=1)
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["y"], b["y"])
    assert a["x"].shape == (10, 5) and set(a["y"]) <= {0, 1, 2}


def test_sample_test_rows_come_from_the_test_split():
    x, y = sample_test_rows(DataConfig(), seed=42, count=5)
    assert x.shape == (5, 64) and len(y) == 5
