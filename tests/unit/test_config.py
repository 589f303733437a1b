import pytest

from mlray.config import load_config, parse_config
from mlray.errors import ConfigError


def test_shipped_config_is_valid():
    cfg = load_config("configs/digits.yaml")
    assert cfg.name == "digits" and cfg.train.num_workers == 2 and cfg.data.source == "digits"


def test_misspelled_field_is_named():
    with pytest.raises(ConfigError, match=r"train\.epohcs: Extra inputs are not permitted"):
        parse_config({"train": {"epohcs": 3}})


def test_bad_value_names_field_value_and_rule():
    with pytest.raises(ConfigError, match=r"train\.num_workers: .*greater than or equal to 1.*got 0"):
        parse_config({"train": {"num_workers": 0}})


def test_overrides_apply_dotted_paths_and_skip_none():
    cfg = parse_config({"train": {"epochs": 3}}, overrides={"train.epochs": 7, "train.batch_size": None})
    assert cfg.train.epochs == 7 and cfg.train.batch_size == 64


def test_file_source_needs_label_column():
    with pytest.raises(ConfigError, match="label_column is required"):
        parse_config({"data": {"source": "/data/x.parquet"}})


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_bad_model_name_pattern():
    with pytest.raises(ConfigError, match=r"name: String should match pattern"):
        parse_config({"name": "bad name/with slash"})


def test_shipped_regression_config_is_valid():
    cfg = load_config("configs/diabetes.yaml")
    assert cfg.task == "regression" and cfg.registry.gate.metric == "test_rmse" and cfg.loss == "mse"


def test_num_classes_is_for_file_sources():
    import pytest

    from mlray.config import parse_config
    from mlray.errors import ConfigError

    with pytest.raises(ConfigError, match="data.num_classes applies to a file source; 'digits' knows its classes"):
        parse_config({"data": {"num_classes": 10}})
