"""The one place mlray reaches into PyTorch below its public API (as mlray/_ray/ is for Ray).

- A state dict carries each module's state version in the attribute ``_metadata`` of the ``OrderedDict``
(``torch.nn.Module.state_dict`` sets it, ``load_state_dict`` reads it: quantized modules read an older
layout when it is missing). A compressed variant stores its state as plain tensors plus a JSON layout, so it
takes the versions out and puts them back here.
- A quantized tensor is rebuilt from its stored integers, scales and zero points exactly with
  ``torch._make_per_tensor_quantized_tensor`` / ``_make_per_channel_quantized_tensor``; the public
  ``quantize_per_*`` would go through float32 values, exact for 8-bit integers but not for ``qint32``.

Checked by tests/unit/test_compress.py's round trips.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


def state_versions(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{module prefix: {"version": n}}`` of a state dict (empty for a plain dict)."""
    return {prefix: dict(info) for prefix, info in getattr(state, "_metadata", {}).items()}


def with_state_versions(state: OrderedDict[str, Any], versions: dict[str, dict[str, Any]]) -> OrderedDict[str, Any]:
    """``state`` carrying ``versions`` as ``load_state_dict`` expects them."""
    state._metadata = OrderedDict(versions)  # type: ignore[attr-defined]
    return state


def per_tensor_quantized(values: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """The quantized tensor whose integers are ``values`` (int8/uint8/int32), with one scale and zero point."""
    return torch._make_per_tensor_quantized_tensor(values, scale, zero_point)


def per_channel_quantized(values: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int
                          ) -> torch.Tensor:
    """The quantized tensor whose integers are ``values``, with a scale and zero point per slice of ``axis``."""
    return torch._make_per_channel_quantized_tensor(values, scales.double(), zero_points.long(), axis)
