"""Compressed variants of a registered model: int8, half precision, pruning, ONNX (see docs/compression.md).

``compress`` makes one, measures it against its parent and registers it when it is within tolerance.
Names are imported on first use: the serving side imports :mod:`mlray.compress.variants` alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mlray.errors import CompressionRefused

__all__ = ["METHODS", "CompressResult", "CompressionRefused", "compress"]

_LAZY = {"compress": "mlray.compress.core", "CompressResult": "mlray.compress.core",
         "METHODS": "mlray.compress.variants"}

if TYPE_CHECKING:
    from mlray.compress.core import CompressResult, compress
    from mlray.compress.variants import METHODS


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlray.compress' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
