"""The top-k classes, by name, of image files under a model file: ours (safetensors, a model folder, a run
directory of tools/train.py: its deploy-form file), ONNX, or OpenVINO IR (.xml, with openvino installed).

The file carries its class names and input settings (written by tools/train.py, tools/convert_deploy.py and
tools/export_onnx.py), so nothing else is needed.

Examples:
    repmlp-predict --weights runs/mine/model.onnx new_photos/
    python tools/predict.py --weights runs/mine a.jpg b.png --top-k 3
"""

from __future__ import annotations

import argparse
import json
import sys

from repmlp.cli.common import run_weights
from repmlp.guards import integer
from repmlp.predict import image_files, load_predictor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files, or folders (their images, recursively)")
    p.add_argument(
        "--weights", "--model-file", dest="weights", required=True, help=".safetensors, .onnx, .xml or a run directory"
    )
    p.add_argument("--top-k", type=integer(1), default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=integer(1), default=16)
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of a line to read")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        predictor = load_predictor(run_weights(args.weights, "deploy"))
        files = image_files(args.images)
        predictions = predictor.predict(files, args.top_k, args.batch_size)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in predictions:
        print(json.dumps({"image": p.path, "top": [{"class": c, "prob": v} for c, v in p.top]}) if args.json else p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
