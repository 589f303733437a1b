"""The worker-side step functions and the model files, without Ray."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mlray.artifact import load_model_dir, write_model_dir
from mlray.errors import ConfigError, ModelLoadError
from mlray.models import ModelSpec, build
from mlray.training.loop import LoopConfig, evaluate, load_state, new_training_state, save_state, train_epoch


def _data(n=256, f=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, f)) * 3
    y = rng.integers(0, k, n)
    x = centres[y] + rng.normal(size=(n, f)) + 10.0
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _batches(x, y, bs=32):
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(y), bs)]


def _cfg(x, epochs=4):
    spec = ModelSpec(factory="mlray.models:mlp", num_features=x.shape[1], num_outputs=3,
                     kwargs={"hidden": [16], "dropout": 0.0})
    return LoopConfig(model=spec.to_dict(), mean=x.mean(0).tolist(), std=x.std(0).tolist(), epochs=epochs,
                      batch_size=32, lr=0.01, weight_decay=0.0, seed=1)


def test_training_learns_and_evaluate_counts():
    x, y = _data()
    model, opt, _ = new_training_state(_cfg(x))
    for _ in range(15):
        stats = train_epoch(model, opt, _batches(x, y))
    assert stats.count == 256
    result, confusion = evaluate(model, _batches(x, y), num_classes=3)
    assert result.accuracy > 0.9
    assert confusion is not None and int(confusion.sum()) == 256 and int(confusion.trace()) == result.correct


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path: Path):
    x, y = _data()
    cfg = _cfg(x)

    def run(epochs, model, opt, sched):
        for _ in range(epochs):
            train_epoch(model, opt, _batches(x, y))
            sched.step()

    model, opt, sched = new_training_state(cfg)
    run(4, model, opt, sched)
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = new_training_state(cfg)
    run(2, model, opt, sched)
    save_state(tmp_path, model=model, optimizer=opt, scheduler=sched, epoch=1, history=[{"epoch": 0}, {"epoch": 1}])
    state = load_state(tmp_path)
    model, opt, sched = new_training_state(cfg)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    assert state["epoch"] == 1 and len(state["history"]) == 2
    run(2, model, opt, sched)
    for a, b in zip(straight, model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_standardize_ships_with_weights(tmp_path: Path):
    x, _ = _data()
    model, _, _ = new_training_state(_cfg(x))
    meta = write_model_dir(tmp_path / "m", model=model, feature_names=[f"f{i}" for i in range(8)],
                           class_names=["a", "b", "c"])
    loaded = load_model_dir(tmp_path / "m", expected_sha256=meta["weights_sha256"])
    assert torch.allclose(loaded.model.standardize.mean, x.mean(0))
    model.eval()
    expected = torch.softmax(model(x[:5]), 1).detach().numpy()
    np.testing.assert_allclose(loaded.predict_proba(x[:5].numpy()), expected, atol=1e-6)


def test_tampered_weights_are_refused(tmp_path: Path):
    model = build(ModelSpec(factory="mlray.models:mlp", num_features=4, num_outputs=2, kwargs={"hidden": [8]}))
    meta = write_model_dir(tmp_path, model=model, feature_names=list("abcd"), class_names=["0", "1"])
    with pytest.raises(ModelLoadError, match="does not match the registry"):
        load_model_dir(tmp_path, expected_sha256="0" * 64)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelLoadError, match="does not match the metadata"):
        load_model_dir(tmp_path, expected_sha256=meta["weights_sha256"])


def test_a_format_1_spec_still_builds_the_same_architecture():
    """Models registered before factories stored {"arch": "mlp", "num_classes": K, "hidden": ...}."""
    old = {"arch": "mlp", "num_features": 4, "num_classes": 3, "hidden": [8], "dropout": 0.0, "extra": {}}
    spec = ModelSpec.from_dict(old)
    assert spec == ModelSpec(factory="mlray.models:mlp", num_features=4, num_outputs=3,
                             kwargs={"hidden": [8], "dropout": 0.0})
    assert build(spec)(torch.zeros(2, 4)).shape == (2, 3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_runs_on_cpu_and_learns(precision):
    """The same step code a GPU runs (autocast + grad scaler); on CUDA it is the `gpu` marked test."""
    x, y = _data()
    model, opt, _ = new_training_state(_cfg(x))
    for _ in range(15):
        stats = train_epoch(model, opt, _batches(x, y), precision=precision)
    assert np.isfinite(stats.loss) and stats.accuracy > 0.8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_mixed_precision_step_on_cuda(precision):
    x, y = _data()
    model, opt, _ = new_training_state(_cfg(x))
    model = model.cuda()
    batches = [(a.cuda(), b.cuda()) for a, b in _batches(x, y)]
    for _ in range(15):
        stats = train_epoch(model, opt, batches, precision=precision)
    assert stats.accuracy > 0.8


def test_cnn_architecture_on_digit_shaped_rows():
    model = build(ModelSpec(factory="mlray.models:cnn", num_features=64, num_outputs=10, kwargs={"hidden": [8, 32]}))
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    with pytest.raises(ConfigError, match="needs square images; 63 features"):
        build(ModelSpec(factory="mlray.models:cnn", num_features=63, num_outputs=10))


def test_a_malicious_pickle_in_place_of_the_weights_never_runs(tmp_path: Path):
    """Loading never unpickles: a pickle that would run code is refused, and its code does not run."""
    import json
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    model = build(ModelSpec(factory="mlray.models:mlp", num_features=4, num_outputs=2, kwargs={"hidden": [8]}))
    meta = write_model_dir(tmp_path / "m", model=model, feature_names=list("abcd"), class_names=["0", "1"])
    (tmp_path / "m" / "weights.safetensors").write_bytes(pickle.dumps(Payload()))
    for expected in (meta["weights_sha256"], None):
        with pytest.raises(ModelLoadError):
            load_model_dir(tmp_path / "m", expected_sha256=expected)
    # even with both hashes made to match the pickle, safetensors cannot parse it as weights
    from mlray.artifact import META_FILE, sha256_file

    meta["weights_sha256"] = sha256_file(tmp_path / "m" / "weights.safetensors")
    (tmp_path / "m" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="do not fit the model spec"):
        load_model_dir(tmp_path / "m", expected_sha256=meta["weights_sha256"])
    assert not marker.exists()
