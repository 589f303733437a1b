"""The model's files: how training writes them and how serving (or any MLflow client) reads them back.

This is where training and serving meet. A model folder holds::

    weights.safetensors   the state dict (safetensors: a format that cannot carry code)
    mlray_model.json      model spec (factory path, kwargs, sizes, task), feature and class names, sha256 of
                          the weights and of the code, versions
    code/                 the source of a user's factory (its top-level package or module), if not mlray's
    body.onnx             a compressed ONNX variant's body (its sha256 in the metadata; see mlray.compress)

Loading checks the weights (and the code) against the sha256 recorded at registration, puts ``code/`` first
on sys.path before it imports the factory, and never unpickles anything. So a process that never imported
the user's module (a Serve replica, ``mlflow.pyfunc.load_model``) rebuilds the same model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlray import __version__
from mlray.errors import ConfigError, ModelLoadError
from mlray.models import ModelSpec, StandardizedModel, build, factory_code

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: factory specs and code/; 1 (arch by name) still loads
VARIANT_FORMAT_VERSION = 3  # 3: a compressed variant (metadata "variant"); older mlray refuses it by number
READABLE_FORMATS = (1, 2, 3)
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "mlray_model.json"
CODE_DIR = "code"
ARTIFACT_KEY = "mlray_model"  # the folder's name inside an MLflow model's artifacts/
MAX_CODE_BYTES = 20 * 1024 * 1024
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".git", ".ipynb_checkpoints")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with what serving shows about it."""

    model: StandardizedModel
    feature_names: list[str]
    class_names: list[str]
    meta: dict[str, Any]
    device: torch.device = torch.device("cpu")
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def variant(self) -> str:
        """The compression method of this version ("dynamic-int8", "onnx", ...), or "none"."""
        return str(self.meta.get("variant", {}).get("method", "none"))

    @property
    def task(self) -> str:
        return self.model.spec.task

    @property
    def num_outputs(self) -> int:
        return self.model.spec.num_outputs

    @torch.inference_mode()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, F) float -> float32 (N, K): class probabilities for classification, values for regression.

        Rows whose float32 forward pass overflows (inputs near float32's limit) are computed again in float64,
        where a classifier's probabilities are finite for any float32 input; a regressor's value beyond
        float32's range stays non-finite, and serving refuses that row by name.
        """
        out = self._forward(self.model, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        result = out.float().cpu().numpy()
        overflowed = ~np.isfinite(result).all(axis=1)
        if overflowed.any() and (wide := self._float64_model()) is not None:
            rows = torch.from_numpy(np.asarray(x, dtype=np.float64)[overflowed])
            with np.errstate(over="ignore"):  # a regressor's value beyond float32: inf, refused by serving
                result[overflowed] = self._forward(wide, rows).cpu().numpy().astype(np.float32)
        return result

    def _forward(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(x.to(self.device))
        return torch.softmax(out, dim=1) if self.task == "classification" else out

    def _float64_model(self) -> torch.nn.Module | None:
        """A float64 copy of the model, made on first need and kept; None for a variant that has no float64
        form (int8 kernels, an ONNX body)."""
        if "float64" not in self._cache:
            try:
                self._cache["float64"] = copy.deepcopy(self.model).double() if self.variant == "none" else None
            except (RuntimeError, TypeError, NotImplementedError) as err:
                logger.warning("no float64 copy of %s for rows that overflow float32: %s", self.meta.get("name"), err)
                self._cache["float64"] = None
        return self._cache["float64"]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, F) -> (N, K) class probabilities; the name from before regression (see :meth:`predict`)."""
        return self.predict(x)


def pyfunc_output(loaded: LoadedModel, outputs: np.ndarray) -> np.ndarray:
    """What predict() returns: (N, K) probabilities; for a regressor (N,) values with one target (as
    scikit-learn's regressors, so MLflow answers ``{"predictions": [numbers]}``), else (N, T)."""
    if loaded.task == "regression" and outputs.shape[1] == 1:
        return outputs[:, 0]
    return outputs


def write_model_dir(
    folder: Path, *, model: StandardizedModel, feature_names: list[str], class_names: list[str],
    extra: dict[str, Any] | None = None, variant: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write weights, metadata and the factory's source into ``folder``; returns the metadata (with sha256s).

    ``variant``: a compressed model's method and lineage (:mod:`mlray.compress`); its state is stored as plain
    tensors with a layout, and an ONNX body already written into ``folder`` gets its sha256 recorded.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if variant is None:
        state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    else:
        from mlray.compress.variants import ONNX_FILE, flatten_state

        state, layout = flatten_state(model.state_dict())
        variant = {**variant, "layout": layout}
        if (folder / ONNX_FILE).is_file():
            variant["onnx_sha256"] = sha256_file(folder / ONNX_FILE)
    save_file(state, str(folder / WEIGHTS_FILE))
    code_sha256 = _copy_code(model.spec.factory, folder / CODE_DIR)
    meta = {
        "format_version": FORMAT_VERSION if variant is None else VARIANT_FORMAT_VERSION,
        "spec": model.spec.to_dict(),
        "feature_names": feature_names,
        "class_names": class_names,
        "weights_sha256": sha256_file(folder / WEIGHTS_FILE),
        "code_sha256": code_sha256,
        "mlray_version": __version__,
        "torch_version": torch.__version__,
        **({"variant": variant} if variant is not None else {}),
        **(extra or {}),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def _copy_code(factory: str, target: Path) -> str | None:
    """Copy the factory's top-level package (or module) under ``target``; returns the tree's sha256."""
    code = factory_code(factory)
    if code is None:
        return None
    if code.top.is_dir():
        shutil.copytree(code.top, target / code.top.name, ignore=_IGNORED)
    else:
        target.mkdir(parents=True)
        shutil.copy2(code.top, target / code.top.name)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    if size > MAX_CODE_BYTES:
        raise ConfigError(f"model.factory {factory!r}: its package {str(code.top)!r} holds {size >> 20} MiB; "
                             f"mlray ships a factory's source with the model up to {MAX_CODE_BYTES >> 20} MiB. "
                             "Keep the model code in a small package of its own, or install it everywhere")
    logger.info("Shipping %s (%d bytes) with the model for model.factory %r", code.top, size, factory)
    return tree_sha256(target)


def tree_sha256(folder: Path) -> str:
    """sha256 over every file's relative path and contents, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def keep_by_hash(source: Path, kind: str, sha256: str) -> Path:
    """A copy of ``source`` in ``<tmp>/<kind>/<sha256>``, made once: files loaded from it stay readable after the
    download folder goes, and the same files are never copied twice."""
    kept = Path(tempfile.gettempdir()) / kind / sha256
    if not kept.is_dir():
        kept.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{sha256[:16]}-", dir=kept.parent))
        shutil.copytree(source, staging, dirs_exist_ok=True)
        try:
            staging.rename(kept)  # atomic: a concurrent loader of the same files finds a complete folder
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another process was first; its copy is the same
    return kept


def _use_code(folder: Path, meta: dict[str, Any]) -> None:
    """Put the model's shipped factory source first on sys.path, after checking it is what was logged.

    The code is kept in a folder named by its sha256 under the temp dir, not used from ``folder``: loaders
    download a model into a temporary folder and delete it once the weights are read, and a package may
    still import its submodules later.
    """
    code = folder / CODE_DIR
    wanted = meta.get("code_sha256")
    if wanted is None:
        return
    if not code.is_dir():
        raise ModelLoadError(f"{folder} has no {CODE_DIR}/ though its metadata records the factory's source")
    actual = tree_sha256(code)
    if actual != wanted:
        raise ModelLoadError(f"code sha256 {actual[:16]}... does not match the metadata's {wanted[:16]}...")
    kept = keep_by_hash(code, "mlray-code", actual)
    if str(kept) not in sys.path:
        # First: the model is rebuilt with the code it was trained with. A module of the same name imported
        # earlier in this process stays in use (Python imports a module once).
        sys.path.insert(0, str(kept))


def default_device() -> torch.device:
    """CUDA when this process sees a GPU (a Serve replica with ``num_gpus``; Ray hides GPUs from others)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def find_model_dir(root: Path) -> Path:
    """The mlray folder inside a downloaded MLflow model (or ``root`` itself)."""
    for candidate in (root, root / "artifacts" / ARTIFACT_KEY, root / ARTIFACT_KEY):
        if (candidate / META_FILE).is_file():
            return candidate
    for found in sorted(root.rglob(META_FILE)):
        return found.parent
    raise ModelLoadError(f"{root} holds no {META_FILE}: not a model logged by mlray")


def load_model_dir(folder: str | Path, *, expected_sha256: str | None = None, device: str | torch.device | None = None
                   ) -> LoadedModel:
    """Rebuild the model from its spec and load the weights, after checking their sha256.

    ``device``: where the model runs; default :func:`default_device` (CUDA if this process has a GPU).
    """
    from safetensors.torch import load_file

    folder = find_model_dir(Path(folder))
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {folder / META_FILE}: {err}") from None
    if meta.get("format_version") not in READABLE_FORMATS:
        raise ModelLoadError(
            f"model format {meta.get('format_version')!r} is not supported (expected one of {READABLE_FORMATS})"
        )
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{weights} is missing")
    actual = sha256_file(weights)
    for source, wanted in (("metadata", meta.get("weights_sha256")), ("registry", expected_sha256)):
        if wanted is not None and actual != wanted:
            raise ModelLoadError(f"weights sha256 {actual[:16]}... does not match the {source}'s {wanted[:16]}...")
    _use_code(folder, meta)
    try:
        model = build(ModelSpec.from_dict(meta["spec"]))
    except Exception as err:  # noqa: BLE001 - a factory that no longer imports or builds
        raise ModelLoadError(f"cannot rebuild the model of {folder}: {err}") from None
    target = torch.device(device) if device is not None else default_device()
    try:
        state: dict[str, Any] = load_file(str(weights))
        if "variant" in meta:
            state = _shape_variant(folder, model, meta["variant"], state)
            target = torch.device("cpu")  # int8 kernels and onnxruntime's provider here are CPU ones
        model.load_state_dict(state)
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means the files do not fit the spec
        raise ModelLoadError(f"weights in {weights} do not fit the model spec: {err}") from None
    model.to(target).eval()
    return LoadedModel(model=model, feature_names=list(meta["feature_names"]),
                       class_names=list(meta["class_names"]), meta=meta, device=target)


def _shape_variant(folder: Path, model: StandardizedModel, variant: dict[str, Any], state: dict[str, Any]
                   ) -> dict[str, Any]:
    """Give ``model`` the compressed body its variant stored (checking an ONNX file's sha256); returns the
    state dict to load into it."""
    from mlray.compress.variants import ONNX_FILE, shape_body, unflatten_state

    method = variant.get("method")
    if "onnx_sha256" in variant:
        actual = sha256_file(folder / ONNX_FILE) if (folder / ONNX_FILE).is_file() else "missing"
        if actual != variant["onnx_sha256"]:
            raise ModelLoadError(f"{ONNX_FILE} sha256 {actual[:16]}... does not match the metadata's "
                                 f"{variant['onnx_sha256'][:16]}...")
    try:
        model.body = shape_body(model.body, str(method), num_features=model.spec.num_features, folder=folder)
        return unflatten_state(state, variant["layout"])
    except Exception as err:  # noqa: BLE001 - a variant this mlray cannot rebuild does not load
        raise ModelLoadError(f"cannot rebuild the {method!r} variant of {folder}: {type(err).__name__}: {err}"
                             ) from None
