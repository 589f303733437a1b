"""`ray job submit --working-dir . -- python jobs/compress.py --model digits --version 1 --method dynamic-int8`

Makes a compressed variant of a registered version, measures it against its parent on the parent's test
split, and registers it as a new version when it is within tolerance (exit status 1 and nothing registered
otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mlray.compress import CompressionRefused, compress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--version", type=int, required=True, help="the parent version")
    parser.add_argument("--method", required=True, help="dynamic-int8 | static-int8 | fp16 | bf16 | prune | onnx")
    parser.add_argument("--tolerance", type=float, default=1.0, help="metric points the variant may lose")
    parser.add_argument("--sparsity", type=float, default=0.5, help="prune: the fraction of weights set to zero")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = compress(args.model, version=args.version, method=args.method, tolerance=args.tolerance,
                          sparsity=args.sparsity)
    except CompressionRefused as err:
        print(json.dumps({"refused": str(err)}))
        sys.exit(1)
    print(json.dumps({"model": args.model, "method": result.method, "parent_version": result.parent_version,
                      "version": result.version, "run_id": result.run_id, "figures": result.figures}))


if __name__ == "__main__":
    main()
