"""Compression on a real MLflow store (SQLite + local artifacts), no Ray: every method on a digits MLP, the
tolerance gate, refusals that register nothing, the ONNX check, a user's factory, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mlray.errors import CompressionRefused, ConfigError, ModelLoadError
from tests.compress_models import train_and_register
from tests.helpers import printed_lines

USERPROJECT = Path(__file__).resolve().parents[1] / "fixtures" / "userproject"
METHODS = ("dynamic-int8", "static-int8", "fp16", "bf16", "prune", "onnx")
FIGURES = {"test_accuracy", "parent_test_accuracy", "metric_loss_points", "size_bytes", "parent_size_bytes",
           "size_ratio", "latency_ms_b1", "latency_ms_b64", "parent_latency_ms_b1", "parent_latency_ms_b64",
           "speedup_b1", "speedup_b64"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLRAY_HOME", str(tmp_path_factory.mktemp("compress-home")))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.syspath_prepend(str(USERPROJECT))
        yield


@pytest.fixture(scope="module")
def parent(store) -> int:
    return train_and_register("digits", model={"hidden": [128, 64], "dropout": 0.0}, epochs=8)


@pytest.fixture(scope="module")
def variants(parent):
    from mlray.compress import compress

    return {method: compress("digits", version=parent, method=method) for method in METHODS}


def _test_split():
    from mlray.compress.measure import Split
    from mlray.config import DataConfig
    from mlray.training.data import local_splits

    rows, _ = local_splits(DataConfig(), seed=42)
    return Split(*rows["test"])


def _versions(name: str) -> list[int]:
    from mlray.registry.tracking import client

    return sorted(int(v.version) for v in client().search_model_versions(f"name='{name}'"))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_registers_a_variant_with_its_figures(variants, parent, method):
    from mlray.api import load_model
    from mlray.compress.measure import test_metrics
    from mlray.registry import get_version
    from mlray.registry.tracking import client

    result = variants[method]
    assert result.method == method and result.parent_version == parent and result.version > parent
    assert FIGURES <= set(result.figures)
    assert result.figures["metric_loss_points"] <= 1.0  # the default tolerance let it through
    info = get_version("digits", version=result.version)
    assert info.tags["mlray.compress.method"] == method
    assert info.tags["mlray.compress.parent_version"] == str(parent)
    assert float(info.tags["mlray.compress.size_bytes"]) == result.figures["size_bytes"]
    run = client().get_run(result.run_id)
    parent_run_id = get_version("digits", version=parent).run_id
    assert run.data.tags["mlflow.parentRunId"] == parent_run_id and run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.figures["test_accuracy"])
    # The registered files, loaded as serving loads them, give the figures the gate saw.
    loaded = load_model("digits", version=result.version)
    assert loaded.variant == method
    assert test_metrics(loaded, _test_split())["test_accuracy"] == pytest.approx(result.figures["test_accuracy"])


def test_what_each_method_does_to_size(variants):
    sizes = {method: variants[method].figures for method in METHODS}
    for method in ("dynamic-int8", "static-int8"):
        assert sizes[method]["size_ratio"] > 2.5, sizes[method]  # int8 weights, float scales per channel
    for method in ("fp16", "bf16"):
        assert sizes[method]["size_ratio"] == pytest.approx(2.0, rel=0.05)
    assert sizes["prune"]["size_ratio"] == 1.0  # zeros are stored densely


def test_pruning_zeroes_the_asked_share_of_weights(variants):
    from mlray.api import load_model

    body = load_model("digits", version=variants["prune"].version).model.body
    weights = [m.weight for m in body.modules() if hasattr(m, "weight") and m.weight is not None]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.01)


def test_onnx_variant_matches_torch_and_runs_on_onnxruntime(variants, parent):
    from mlray.api import load_model
    from mlray.compress.variants import OrtBody

    onnx = load_model("digits", version=variants["onnx"].version)
    torch_model = load_model("digits", version=parent)
    assert isinstance(onnx.model.body, OrtBody)
    x = _test_split().x
    np.testing.assert_allclose(onnx.predict(x), torch_model.predict(x), atol=1e-5)


def test_a_tampered_onnx_file_does_not_load(variants, tmp_path):
    import mlflow

    from mlray.artifact import find_model_dir, load_model_dir

    local = Path(mlflow.artifacts.download_artifacts(f"models:/digits/{variants['onnx'].version}",
                                                     dst_path=str(tmp_path)))
    folder = find_model_dir(local)
    (folder / "body.onnx").write_bytes((folder / "body.onnx").read_bytes()[:-8])
    with pytest.raises(ModelLoadError, match="body.onnx sha256 .* does not match the metadata"):
        load_model_dir(folder)


def test_mlflow_pyfunc_loads_a_variant(variants):
    import mlflow
    import pandas as pd

    from mlray.api import load_model

    x = _test_split().x[:16]
    for method in ("dynamic-int8", "onnx"):
        version = variants[method].version
        loaded = load_model("digits", version=version)
        pyfunc = mlflow.pyfunc.load_model(f"models:/digits/{version}")
        answer = pyfunc.predict(pd.DataFrame(x.astype(np.float64), columns=loaded.feature_names))
        np.testing.assert_allclose(np.asarray(answer), loaded.predict(x), atol=1e-6)


def test_tolerance_zero_refuses_a_variant_that_lost_accuracy_and_registers_nothing(parent):
    from mlray.compress import compress
    from mlray.registry.tracking import client

    before = _versions("digits")
    with pytest.raises(CompressionRefused) as refused:
        compress("digits", version=parent, method="prune", sparsity=0.9, tolerance=0.0)
    message = str(refused.value)
    assert "refused to register the prune variant: test_accuracy" in message
    assert f"of version {parent}" in message and "tolerance 0)" in message and "nothing was registered" in message
    figures = [float(f) for f in message.split("test_accuracy ")[1].split(" of version")[0].split(" vs ")]
    assert figures[0] < figures[1]  # both figures are in the message: the variant's, then the parent's
    assert _versions("digits") == before
    runs = client().search_runs([client().get_experiment_by_name("digits").experiment_id],
                                "tags.`mlray.compress.outcome` = 'refused'")
    assert runs and runs[0].data.metrics["metric_loss_points"] > 0


@pytest.mark.parametrize("method", ["dynamic-int8", "static-int8", "bf16"])
def test_tolerance_zero_registers_only_a_variant_that_lost_nothing(parent, method):
    from mlray.compress import compress

    before = _versions("digits")
    try:
        result = compress("digits", version=parent, method=method, tolerance=0.0)
    except CompressionRefused as refused:
        assert "points lost, tolerance 0)" in str(refused) and _versions("digits") == before
    else:
        assert result.figures["metric_loss_points"] <= 0.0 and _versions("digits") == [*before, result.version]


def test_bad_method_and_options_are_named_before_anything_runs(parent):
    from mlray.compress import compress

    before = _versions("digits")
    with pytest.raises(ConfigError, match=r"method 'int4' is not a compression method; expected one of "
                                          r"dynamic-int8, static-int8, fp16, bf16, prune, onnx"):
        compress("digits", version=parent, method="int4")
    with pytest.raises(ConfigError, match=r"sparsity 1.5 must be in \[0, 1\)"):
        compress("digits", version=parent, method="prune", sparsity=1.5)
    with pytest.raises(ConfigError, match="tolerance -1 must be a number of points >= 0"):
        compress("digits", version=parent, method="fp16", tolerance=-1)
    assert _versions("digits") == before


def test_a_variant_is_not_compressed_again(variants):
    from mlray.compress import compress

    with pytest.raises(CompressionRefused, match="is already a dynamic-int8 variant of version 1"):
        compress("digits", version=variants["dynamic-int8"].version, method="fp16")


def test_methods_that_do_not_apply_are_refused_with_the_reason(store):
    from mlray.compress import compress

    version = train_and_register("clipped", model={"factory": "usermodel.nets:clipped"}, epochs=1)
    with pytest.raises(CompressionRefused, match=r"static-int8 does not apply to this model: torch.fx cannot "
                                                 r"trace its module \(TraceError: symbolically traced"):
        compress("clipped", version=version, method="static-int8")
    with pytest.raises(CompressionRefused, match=r"onnx does not apply to this model: the export failed "
                                                 r"\(GuardOnDataDependentSymNode"):
        compress("clipped", version=version, method="onnx")
    assert _versions("clipped") == [version]


def test_a_user_factory_model_compresses_the_same_way(store):
    from mlray.api import load_model
    from mlray.compress import compress

    version = train_and_register("usermodel", epochs=3,
                                 model={"factory": "usermodel.nets:residual_mlp", "kwargs": {"width": 64}})
    x = _test_split().x
    parent = load_model("usermodel", version=version).predict(x)
    result = compress("usermodel", version=version, method="dynamic-int8")
    loaded = load_model("usermodel", version=result.version)
    assert loaded.variant == "dynamic-int8" and loaded.meta["code_sha256"]  # the factory's source travels along
    agree = float((loaded.predict(x).argmax(1) == parent.argmax(1)).mean())
    assert agree > 0.97, agree


def test_cli_compress_prints_one_line_or_json_and_one_error_line(parent, capsys):
    from mlray.cli import run

    capsys.readouterr()
    assert run(["compress", "digits", "--version", str(parent), "--method", "fp16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "fp16" and out["parent_version"] == parent and out["figures"]["size_ratio"] > 1.9
    assert run(["compress", f"models:/digits/{parent}", "--method", "bf16"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"digits version {out['version'] + 1}: bf16 of version {parent}, test_accuracy ")
    assert run(["compress", "digits", "--version", str(parent), "--method", "int4"]) == 1
    err = printed_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: method 'int4' is not a compression method")


def test_the_job_entrypoint_refuses_with_exit_status_1(parent, tmp_path):
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "jobs" / "compress.py"), "--model", "digits", "--version",
                           str(parent), "--method", "prune", "--sparsity", "0.95", "--tolerance", "0"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "refused to register the prune variant" in json.loads(done.stdout.strip().splitlines()[-1])["refused"]


def test_sizes_count_the_onnx_graph(tmp_path):
    from mlray.compress.measure import size_bytes

    (tmp_path / "weights.safetensors").write_bytes(b"x" * 10)
    assert size_bytes(tmp_path) == 10
    (tmp_path / "body.onnx").write_bytes(b"x" * 5)
    assert size_bytes(tmp_path) == 15


def test_a_regressor_on_a_csv_file_is_gated_on_rmse(store, tmp_path_factory):
    import pandas as pd

    from mlray.compress import compress

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 6))
    table = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)])
    table["target"] = x @ np.arange(1, 7) + 50.0 + rng.normal(scale=0.1, size=600)
    path = tmp_path_factory.mktemp("regression") / "rows.csv"
    table.to_csv(path, index=False)
    version = train_and_register("reg", task="regression", epochs=15, model={"hidden": [32], "dropout": 0.0},
                                 data={"source": str(path), "label_column": "target"})
    result = compress("reg", version=version, method="fp16", tolerance=5.0)
    assert result.figures["test_rmse"] > 0 and abs(result.figures["metric_loss_points"]) < 5.0
    with pytest.raises(CompressionRefused, match=r"test_rmse .* vs .* of version 1 \(.* points lost, tolerance 0"):
        compress("reg", version=version, method="prune", sparsity=0.9, tolerance=0.0)
    table.iloc[:10].to_csv(path, index=False)  # the data changed since training: not the same test split
    from mlray.errors import DataError

    with pytest.raises(DataError, match="the data changed, so its test split is not the same"):
        compress("reg", version=version, method="fp16")
