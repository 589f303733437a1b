"""Compressed variants against their parent, each measured in the same run: size, CPU latency, accuracy.

    python bench/compress.py [--methods dynamic-int8,onnx] [--models digits,wide]

For each model (the digits MLP, 128-64 hidden units, a wide MLP, 4 x 1024, and mlray's CNN), trained in this process on
the digits split and registered in a throwaway MLflow store, every method runs through ``mlray.compress``
with an unlimited tolerance (the bench measures; it does not gate). ``compress`` measures the parent and
the variant back to back, loaded from their files as a replica loads them: the ratios below are parent /
variant (above 1 is better), the accuracy change is in points on the parent's test split. Latency is the
median of repeated ``LoadedModel.predict`` calls after warm-up (mlray/compress/measure.py). No Ray.

Targets (issue 14): dynamic int8 >= 3.5x smaller on linear-heavy models, >= 1.3x faster at batch 64, and
< 0.5 points of accuracy lost on digits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "digits": ({"hidden": [128, 64], "dropout": 0.0}, 10),  # (job config's model section, epochs)
    "wide": ({"hidden": [1024, 1024, 1024, 1024], "dropout": 0.0}, 4),
    "cnn": ({"arch": "cnn", "dropout": 0.0}, 4),  # mlray's built-in CNN (32 and 64 channels, 128 dense)
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="dynamic-int8,static-int8,fp16,bf16,prune,onnx")
    parser.add_argument("--models", default="digits,wide,cnn")
    args = parser.parse_args()
    os.environ["MLRAY_HOME"] = tempfile.mkdtemp(prefix="mlray-bench-compress-")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    sys.path.insert(0, str(ROOT))
    logging.basicConfig(level=logging.WARNING)

    import torch

    from mlray.compress import compress
    from tests.compress_models import train_and_register

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; latency with one intra-op thread, as a replica")
    header = ("| model  | method       | bytes: parent -> variant | size x | ms b1: parent -> variant | x b1 "
              "| ms b64: parent -> variant | x b64 | accuracy: parent -> variant | change (points) |")
    rows = [header, "|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|"]
    for name in args.models.split(","):
        model, epochs = MODELS[name]
        version = train_and_register(name, model=model, epochs=epochs)
        for method in args.methods.split(","):
            f = compress(name, version=version, method=method, tolerance=100.0).figures
            rows.append(row(name, method, f))
            print(rows[-1], flush=True)
    print("\n".join(rows))


def row(name: str, method: str, f: dict[str, float]) -> str:
    def pair(key: str, digits: int) -> str:
        return f"{f['parent_' + key]:.{digits}f} -> {f[key]:.{digits}f}"

    return (f"| {name:<6} | {method:<12} | {pair('size_bytes', 0):>24} | {f['size_ratio']:>6.2f} "
            f"| {pair('latency_ms_b1', 3):>24} | {f['speedup_b1']:>4.2f} | {pair('latency_ms_b64', 3):>25} "
            f"| {f['speedup_b64']:>5.2f} | {pair('test_accuracy', 4):>27} | {0.0 - f['metric_loss_points']:>+15.2f} |")


if __name__ == "__main__":
    main()
