"""How a compressed variant's body is built, stored and rebuilt, without pickle.

A variant is a :class:`~mlray.models.StandardizedModel` whose ``body`` (the factory's module) has been
transformed; standardisation stays in float32 torch. This module is the load side, used by
:func:`mlray.artifact.load_model_dir` in any process (a Serve replica, ``mlflow.pyfunc.load_model``):

- int8 (dynamic and static): quantized modules' state holds quantized tensors, packed ``(weight, bias)``
  tuples and dtypes, none of which safetensors stores. :func:`flatten_state` turns them into plain tensors
  (int8 values, scales, zero points) and a JSON layout; :func:`unflatten_state` reverses it, and the
  quantized module structure is rebuilt by quantizing a freshly built float body the same way.
- fp16 / bf16: the body's weights in half precision, behind :class:`CastBody`.
- prune: plain float32 weights with zeros; nothing to rebuild.
- onnx: the body as an ONNX graph run by onnxruntime (:class:`OrtBody`), checked by its sha256.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlray._torch import per_channel_quantized, per_tensor_quantized, state_versions, with_state_versions

METHODS = ("dynamic-int8", "static-int8", "fp16", "bf16", "prune", "onnx")
ONNX_FILE = "body.onnx"
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
_QDTYPES = {str(d): d for d in (torch.qint8, torch.quint8, torch.qint32, torch.float16)}
_SEP = "#"  # joins a state key and a part: "0._packed_params._packed_params#0#int8"


@contextlib.contextmanager
def quiet_quantization() -> Iterator[None]:
    """torch.ao.quantization warns that it moves to torchao; it still ships with torch 2.13 and is what the
    issue names. Silence that (and the observers' reduce_range notice) for our calls only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.ao.quantization")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*reduce_range")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*quantized tensor creation")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*must run observer")
        yield


class CastBody(nn.Module):
    """A body held in fp16 or bf16: (B, F) float32 in, (B, K) float32 out."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


class OrtBody(nn.Module):
    """The body as an ONNX graph on onnxruntime's CPU provider: (B, F) float32 -> (B, K) float32."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        # One thread, no spinning: next to torch's own threads (and other replicas) on few cores, onnxruntime's
        # spinning pool made small calls far slower (bench/README.md).
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.detach().cpu().numpy()))


def dynamic_int8(body: nn.Module) -> nn.Module:
    """Linear layers with int8 weights (per output channel) and activations quantized on the fly."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with quiet_quantization():
        return quantize_dynamic(body, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def static_int8_prepared(body: nn.Module, num_features: int) -> nn.Module:
    """FX graph with observers (x86 defaults: per-channel int8 weights, uint8 activations), to calibrate."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    with quiet_quantization():
        return prepare_fx(body.eval(), get_default_qconfig_mapping("x86"), (torch.zeros(2, num_features),))


def static_int8_convert(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with quiet_quantization():
        return convert_fx(prepared)  # type: ignore[arg-type]


def shape_body(body: nn.Module, method: str, *, num_features: int, folder: Path | None = None) -> nn.Module:
    """A freshly built float body turned into the variant's structure, ready for its stored state."""
    if method == "dynamic-int8":
        return dynamic_int8(body)
    if method == "static-int8":
        return static_int8_convert(static_int8_prepared(body, num_features))  # placeholders; state sets them
    if method in _HALF:
        return CastBody(body, _HALF[method])
    if method == "prune":
        return body
    if method == "onnx":
        assert folder is not None, "an ONNX body is read from the model folder"
        return OrtBody(folder / ONNX_FILE)
    raise ValueError(f"unknown compression method {method!r}; expected one of {METHODS}")


# -- quantized state as plain tensors ---------------------------------------------------------------------------

def flatten_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state dict with quantized tensors, tuples and dtypes -> plain tensors and a JSON layout."""
    tensors: dict[str, torch.Tensor] = {}
    entries = {key: _flatten_value(key, value, tensors) for key, value in state.items()}
    # Each module's state version: quantized modules read an old layout when it is missing.
    return tensors, {"entries": entries, "versions": state_versions(state)}


def _flatten_value(key: str, value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.dtype):
        return {"dtype": str(value)}
    if value is None:
        return {"none": True}
    if isinstance(value, tuple | list):
        return {"tuple": [_flatten_value(f"{key}{_SEP}{i}", item, tensors) for i, item in enumerate(value)]}
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state entry {key!r} is a {type(value).__name__}, which a variant cannot store")
    if not value.is_quantized:
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    tensors[f"{key}{_SEP}int"] = value.int_repr().contiguous()
    entry: dict[str, Any] = {"qdtype": str(value.dtype), "int": f"{key}{_SEP}int"}
    if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        tensors[f"{key}{_SEP}scales"] = value.q_per_channel_scales().float().contiguous()
        tensors[f"{key}{_SEP}zero_points"] = value.q_per_channel_zero_points().int().contiguous()
        entry.update(axis=int(value.q_per_channel_axis()), scales=f"{key}{_SEP}scales",
                     zero_points=f"{key}{_SEP}zero_points")
    else:
        entry.update(scale=float(value.q_scale()), zero_point=int(value.q_zero_point()))
    return entry


def unflatten_state(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> OrderedDict[str, Any]:
    """The inverse of :func:`flatten_state`: a state dict ``load_state_dict`` takes."""
    with quiet_quantization():
        state = OrderedDict((key, _unflatten_value(entry, tensors)) for key, entry in layout["entries"].items())
    return with_state_versions(state, layout["versions"])


def _unflatten_value(entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "dtype" in entry:
        return _QDTYPES[entry["dtype"]]
    if entry.get("none"):
        return None
    if "tuple" in entry:
        return tuple(_unflatten_value(item, tensors) for item in entry["tuple"])
    if "tensor" in entry:
        return tensors[entry["tensor"]]
    values = tensors[entry["int"]]
    if "axis" in entry:
        return per_channel_quantized(values, tensors[entry["scales"]], tensors[entry["zero_points"]], entry["axis"])
    return per_tensor_quantized(values, entry["scale"], entry["zero_point"])
