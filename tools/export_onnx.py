#!/usr/bin/env python
"""Export a model's deploy form to ONNX at its fixed input size, and check the file.

Converts a train-form model (random weights with randomised BN statistics unless --weights is given) to its deploy
form, exports it with torch.onnx, refuses graphs with a tensor of rank > 5, runs the file in onnxruntime and
compares with PyTorch (max relative error <= 1e-4). Needs the onnx extra: pip install -e .[onnx]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)

import torch  # noqa: E402

import repmlp  # noqa: E402
from repmlp.export import export_onnx  # noqa: E402
from repmlp.models import load_model  # noqa: E402
from repmlp.verify import randomize_bn_stats  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="repmlp_res50_light_224", help="timm name or package.module:factory")
    p.add_argument("--weights", help="checkpoint to load (train or deploy form, ours or the authors')")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON kwargs for the model factory")
    p.add_argument("--output", help="the .onnx file (default: output/<model>_deploy.onnx)")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the exported (static) input shape")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max rel error of onnxruntime vs PyTorch")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.weights:
        model = load_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=args.weights),
                           **args.model_kwargs)
        source = f"weights {args.weights}"
    else:
        model = randomize_bn_stats(load_model(args.model, **args.model_kwargs), args.seed)
        source = f"RANDOM weights (seed {args.seed}) with randomised BN statistics"
    print(f"model   {args.model} ({source})")
    model.eval()
    if not repmlp.is_deploy_form(model):
        start = time.perf_counter()
        model = repmlp.convert_to_deploy(model, inplace=True)
        print(f"convert {time.perf_counter() - start:.3f} s")
    output = Path(args.output or f"output/{args.model.replace(':', '_')}_deploy.onnx")
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = export_onnx(model, output, batch_size=args.batch_size, opset=args.opset, tolerance=args.tolerance,
                         seed=args.seed)
    print(f"export  {time.perf_counter() - start:.1f} s")
    print(f"check   {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
