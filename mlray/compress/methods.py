"""Making a variant from a parent model: one function per method, each a refusal when it does not apply.

Every method takes the parent's :class:`~mlray.models.StandardizedModel` and returns a new one whose body
is transformed (the parent is never modified); standardisation stays in float32. The load side of each
format is in :mod:`mlray.compress.variants`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlray.compress import variants
from mlray.errors import CompressionRefused, ConfigError
from mlray.models import StandardizedModel

logger = logging.getLogger(__name__)

ONNX_ATOL = 1e-4  # onnxruntime vs torch on the body's outputs (logits), float32
ONNX_RTOL = 1e-3
CALIBRATION_ROWS = 1024  # rows of the training split the static int8 observers see


@dataclass(frozen=True)
class VariantInputs:
    """What a method may use besides the parent: rows of the parent's own splits, float32 (N, F)."""

    train_x: np.ndarray
    test_x: np.ndarray
    sparsity: float = 0.5


def check_method(method: str, *, sparsity: float = 0.5) -> None:
    """A :class:`ConfigError` naming the value unless ``method`` is known and ``sparsity`` is in [0, 1)."""
    if method not in variants.METHODS:
        raise ConfigError(f"method {method!r} is not a compression method; expected one of "
                          f"{', '.join(variants.METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity {sparsity!r} must be in [0, 1): the fraction of weights pruning zeroes")


def make_variant(parent: StandardizedModel, method: str, inputs: VariantInputs, *, folder: Path
                 ) -> StandardizedModel:
    """The parent compressed by ``method``; files a method needs at load time (ONNX) go into ``folder``."""
    check_method(method, sparsity=inputs.sparsity)
    model = copy.deepcopy(parent).cpu().eval()
    body = model.body
    if method == "dynamic-int8":
        _need(method, body, (nn.Linear,), "it quantizes nn.Linear layers and the model has none")
        model.body = variants.dynamic_int8(body)
    elif method == "static-int8":
        model.body = _static_int8(model, inputs.train_x)
    elif method in ("fp16", "bf16"):
        model.body = variants.CastBody(body, torch.float16 if method == "fp16" else torch.bfloat16)
    elif method == "prune":
        _prune(body, inputs.sparsity)
    elif method == "onnx":
        model.body = _onnx(model, inputs.test_x, folder)
    return model.eval()


def _need(method: str, body: nn.Module, kinds: tuple[type[nn.Module], ...], why: str) -> None:
    if not any(isinstance(m, kinds) for m in body.modules()):
        raise CompressionRefused(f"{method} does not apply to this model: {why}")


def _static_int8(model: StandardizedModel, train_x: np.ndarray) -> nn.Module:
    """FX graph mode: trace, observe the training split's activations (after standardisation), convert."""
    num_features = model.spec.num_features
    try:
        prepared = variants.static_int8_prepared(model.body, num_features)
    except Exception as err:  # noqa: BLE001 - FX cannot trace the module (data-dependent control flow, ...)
        raise CompressionRefused(f"static-int8 does not apply to this model: torch.fx cannot trace its module "
                                 f"({_first_line(err)})") from None
    rows = torch.from_numpy(np.ascontiguousarray(train_x[:CALIBRATION_ROWS], dtype=np.float32))
    try:
        with torch.no_grad():
            for start in range(0, len(rows), 256):
                prepared(model.standardize(rows[start : start + 256]))  # (B, F): what the body sees
        converted = variants.static_int8_convert(prepared)
        with torch.no_grad():
            converted(model.standardize(rows[:2]))  # an op without a quantized kernel fails here
    except Exception as err:  # noqa: BLE001 - an op that has no int8 kernel
        raise CompressionRefused(f"static-int8 does not apply to this model: an operation cannot run in int8 "
                                 f"({_first_line(err)})") from None
    return converted


def _prune(body: nn.Module, sparsity: float) -> None:
    """Zero the smallest-magnitude ``sparsity`` of the Linear and Conv weights, made permanent (no masks)."""
    from torch.nn.utils import prune

    layers = [m for m in body.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)]
    if not layers:
        raise CompressionRefused("prune does not apply to this model: it prunes Linear and Conv weights and the "
                                 "model has none")
    # Global magnitude: the smallest weights of all layers together, so a small, dense layer (the first one, on
    # standardised inputs) keeps more of its weights than a large one.
    prune.global_unstructured([(layer, "weight") for layer in layers], pruning_method=prune.L1Unstructured,
                              amount=sparsity)
    for layer in layers:
        prune.remove(layer, "weight")  # weight = weight_orig * mask, as a plain parameter again


def _onnx(model: StandardizedModel, test_x: np.ndarray, folder: Path) -> nn.Module:
    """Export the body with torch's exporter, then check onnxruntime against torch on the test split."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / variants.ONNX_FILE
    example = torch.zeros(2, model.spec.num_features)
    try:
        chatter = io.StringIO()  # the exporter prints its steps, and whole graphs when it fails
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            program = torch.onnx.export(model.body, (example,), dynamo=True, input_names=["x"], output_names=["y"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        assert program is not None
        program.save(str(path))
        onnx.checker.check_model(str(path))
        body = variants.OrtBody(path)
    except Exception as err:  # noqa: BLE001 - an op the exporter or onnxruntime does not support
        path.unlink(missing_ok=True)
        raise CompressionRefused(f"onnx does not apply to this model: the export failed "
                                 f"({_first_line(err)})") from None
    rows = torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.float32))
    with torch.no_grad():
        seen = model.standardize(rows)
        wanted = model.body(seen).float().numpy()  # (N, K) torch's logits
    got = body.run(seen.numpy())
    if got.shape != wanted.shape or not np.allclose(got, wanted, atol=ONNX_ATOL, rtol=ONNX_RTOL):
        worst = float(np.abs(got - wanted).max()) if got.shape == wanted.shape else float("inf")
        raise CompressionRefused(f"onnx: onnxruntime's outputs differ from torch's on the test split by up to "
                                 f"{worst:.3g} (allowed {ONNX_ATOL} + {ONNX_RTOL} x |value|)")
    logger.info("ONNX body matches torch on %d test rows (max |diff| %.3g)", len(rows),
                float(np.abs(got - wanted).max()) if len(rows) else 0.0)
    return body


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause (the exporter wraps torch.export's error in its own)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"
