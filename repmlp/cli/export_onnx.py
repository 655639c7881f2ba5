"""Export a model's deploy form to ONNX (or OpenVINO IR) at its input size and any batch, optionally int8, and check
the file.

Converts a train-form model (random weights with randomised BN statistics unless --weights or --pretrained is given)
to its deploy form, exports it with torch.onnx with a dynamic batch (--static-batch fixes it to --batch-size),
refuses graphs with a tensor of rank > 5, runs the file in onnxruntime and compares with PyTorch (max relative error
<= --tolerance) at --batch-size and one more. --quantize dynamic|static writes the int8 file made by onnxruntime's
quantization tools instead, after checking it against the float32 one in onnxruntime (argmax agreement >=
--min-agreement). --format openvino writes OpenVINO IR (NAME.xml and NAME.bin, float32 weights) converted by
openvino.convert_model and checked in OpenVINO (float32) the same way. The file is renamed into place only when
every check passed; it records what predicting needs (class names, input settings: repmlp.preprocess). Needs the
onnx extra (pip install -e .[onnx]), for OpenVINO the openvino extra.

Examples:
    # static int8 of the shipped model, calibrated on Fashion-MNIST training images
    python tools/export_onnx.py --model repmlp_fmnist_mlp.fmnist --pretrained --quantize static --batch-size 8
    # a size the blocks pad (30 is no multiple of the 8x8 partitions), random weights
    python tools/export_onnx.py --model repmlp_cifar_mlp --model-kwargs '{"img_size": 30}'
    # the shipped model as OpenVINO IR
    python tools/export_onnx.py --model repmlp_fmnist_mlp.fmnist --pretrained --format openvino
"""

from __future__ import annotations

__all__ = ["main", "parse_args"]

import argparse
import sys
import time
import warnings

import torch

import repmlp
from repmlp.cli.common import add_model_arguments
from repmlp.export import OPSETS, export_onnx, export_openvino
from repmlp.guards import add_overwrite_argument, check_outputs, integer, number
from repmlp.onnx_io import set_onnx_metadata
from repmlp.preprocess import INPUT_KEYS, LABEL_KEY, input_metadata
from repmlp.quantize import QUANTIZE_MODES, data_batches
from repmlp.sources import model_source

warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)

RANDOM_DEFAULT = "repmlp_res50_light_224"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(
        p, f"{RANDOM_DEFAULT} with random weights", "weights file or model folder, train or deploy form"
    )
    p.add_argument("--output", help="the .onnx (or .xml) file (default: output/<model>_deploy.onnx or .xml)")
    add_overwrite_argument(p)
    p.add_argument("--format", choices=("onnx", "openvino"), default="onnx", help="ONNX, or OpenVINO IR (float32)")
    p.add_argument(
        "--batch-size", type=integer(1), default=1, help="batch of the example traced and checked (and one more)"
    )
    p.add_argument("--static-batch", action="store_true", help="fix the file's batch to --batch-size")
    p.add_argument("--opset", type=integer(OPSETS.start, OPSETS.stop - 1), default=17, help="ONNX opset (default 17)")
    p.add_argument("--tolerance", type=number(0), default=1e-4, help="max rel error of onnxruntime vs PyTorch")
    p.add_argument("--seed", type=integer(0), default=0)
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default="none",
        help="int8 by onnxruntime: 'dynamic' (no data) or 'static' (calibrated on --calibration)",
    )
    p.add_argument(
        "--calibration",
        help="'random' or DATASET[:ROOT] as in the training configs, e.g. fashion_mnist "
        "(default: a shipped model's dataset, else random inputs)",
    )
    p.add_argument(
        "--calibration-samples", type=integer(1), default=256, help="training images that calibrate 'static'"
    )
    p.add_argument(
        "--check-samples",
        type=integer(1),
        default=256,
        help="held-out images (or random inputs) on which int8 is compared with float32",
    )
    p.add_argument(
        "--min-agreement",
        type=number(0, 1),
        default=0.97,
        help="least int8/float32 argmax agreement to write: a check against broken quantization, not a measure of "
        "accuracy (a few flips in 256 images are normal; accuracy: tools/eval.py --onnx)",
    )
    p.add_argument(
        "--reduce-range",
        choices=("auto", "on", "off"),
        default="auto",
        help="7-bit int8 weights (auto: on for CPUs without VNNI, whose int8 kernels saturate otherwise)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.format == "openvino" and args.quantize != "none":
        print("error: --quantize writes onnxruntime's int8 ONNX; --format openvino writes float32 IR", file=sys.stderr)
        return 2
    try:
        check_outputs({"--output": args.output}, [args.weights], args.overwrite)  # refused before any reading
        source = model_source(
            args.model,
            args.weights,
            args.pretrained,
            args.model_kwargs,
            seed=args.seed,
            default=RANDOM_DEFAULT,
            use_ema=args.ema,
        )
        model, name = source.model, source.name
        repmlp.convert.check_convertible(model)  # NaN weights, negative variances: refused before converting
        suffix = "deploy" if args.quantize == "none" else f"int8_{args.quantize}"
        extension = ".xml" if args.format == "openvino" else ".onnx"
        output = args.output or f"output/{name.replace(':', '_')}_{suffix}{extension}"
        output = check_outputs({"--output": output}, [args.weights, source.path], args.overwrite)["--output"]
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model   {name} ({source.weights})")
    model.eval()
    if not repmlp.is_deploy_form(model):
        start = time.perf_counter()
        model = repmlp.convert_to_deploy(model, inplace=True)
        print(f"convert {time.perf_counter() - start:.3f} s")
    int8 = {}
    if args.quantize != "none":
        data = args.calibration or source.dataset or "random"
        label = data if data != "random" else "random (no dataset for this model: calibration is only indicative)"
        print(f"data    {label}")
        calibration = data_batches(data, model, args.batch_size, args.calibration_samples, "train", args.seed)
        check = data_batches(data, model, args.batch_size, args.check_samples, "val", args.seed + 1)
        reduce_range = dict(auto=None, on=True, off=False)[args.reduce_range]
        int8 = dict(
            quantize=args.quantize,
            calibration=calibration,
            check_batches=check,
            check_data=f"{data} (val)",
            min_agreement=args.min_agreement,
            reduce_range=reduce_range,
        )
    # what predicting and evaluating need, in the file: as the weights record it (training's classes, transform and
    # data), else the model's
    recorded = {k: v for k, v in source.record.items() if k in (LABEL_KEY, *INPUT_KEYS, "dataset", "config")}
    metadata = {**input_metadata(model), **recorded, "model": name, "form": "deploy"}
    start = time.perf_counter()
    common = dict(batch_size=args.batch_size, tolerance=args.tolerance, seed=args.seed)
    common["dynamic_batch"] = not args.static_batch
    try:
        if args.format == "openvino":
            report = export_openvino(model, output, metadata=metadata, **common)
        else:
            report = export_onnx(model, output, opset=args.opset, **common, **int8)
            set_onnx_metadata(output, metadata)
    except RuntimeError as err:  # a check failed: nothing written
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"export  {time.perf_counter() - start:.1f} s")
    print(f"check   {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
