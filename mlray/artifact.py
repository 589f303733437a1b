"""The model's files: how training writes them and how serving (or any MLflow client) reads them back.

This is where training and serving meet. A model folder holds::

    weights.safetensors   the state dict (safetensors: a format that cannot carry code)
    mlray_model.json      architecture spec, feature and class names, sha256 of the weights, versions

Loading checks the weights against the sha256 recorded at registration and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlray import __version__
from mlray.errors import ModelLoadError
from mlray.models import Classifier, ModelSpec, build

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "mlray_model.json"
ARTIFACT_KEY = "mlray_model"  # the folder's name inside an MLflow model's artifacts/


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with what serving shows about it."""

    model: Classifier
    feature_names: list[str]
    class_names: list[str]
    meta: dict[str, Any]

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @torch.inference_mode()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, F) float -> (N, K) class probabilities, float32."""
        logits = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return torch.softmax(logits, dim=1).numpy()


def write_model_dir(
    folder: Path, *, model: Classifier, feature_names: list[str], class_names: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write weights and metadata into ``folder``; returns the metadata (with the weights' sha256)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        "spec": model.spec.to_dict(),
        "feature_names": feature_names,
        "class_names": class_names,
        "weights_sha256": sha256_file(folder / WEIGHTS_FILE),
        "mlray_version": __version__,
        "torch_version": torch.__version__,
        **(extra or {}),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def find_model_dir(root: Path) -> Path:
    """The mlray folder inside a downloaded MLflow model (or ``root`` itself)."""
    for candidate in (root, root / "artifacts" / ARTIFACT_KEY, root / ARTIFACT_KEY):
        if (candidate / META_FILE).is_file():
            return candidate
    for found in sorted(root.rglob(META_FILE)):
        return found.parent
    raise ModelLoadError(f"{root} holds no {META_FILE}: not a model logged by mlray")


def load_model_dir(folder: Path, *, expected_sha256: str | None = None) -> LoadedModel:
    """Rebuild the model from its spec and load the weights, after checking their sha256."""
    from safetensors.torch import load_file

    folder = find_model_dir(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {folder / META_FILE}: {err}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"model format {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{weights} is missing")
    actual = sha256_file(weights)
    for source, wanted in (("metadata", meta.get("weights_sha256")), ("registry", expected_sha256)):
        if wanted is not None and actual != wanted:
            raise ModelLoadError(f"weights sha256 {actual[:16]}... does not match the {source}'s {wanted[:16]}...")
    model = build(ModelSpec.from_dict(meta["spec"]))
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as err:  # noqa: BLE001 - any failure here means the files do not fit the spec
        raise ModelLoadError(f"weights in {weights} do not fit the model spec: {err}") from None
    model.eval()
    return LoadedModel(model=model, feature_names=list(meta["feature_names"]),
                       class_names=list(meta["class_names"]), meta=meta)
