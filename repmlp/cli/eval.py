"""Top-1, top-5 and loss of a train- or deploy-form checkpoint on a dataset.

Model, classes, arguments, form and dataset come from the checkpoint's metadata (files written by this package);
arguments fill what a file does not record, and an argument that contradicts it is an error.

Examples:
    python tools/eval.py --checkpoint pretrained/repmlp_fmnist_mlp.fmnist
    python tools/eval.py --checkpoint runs/fmnist --form deploy      # a run directory: its deploy-form file
    python tools/eval.py --checkpoint runs/fmnist/model_train.safetensors --form deploy
    python tools/eval.py --model repmlp_fmnist_mlp.fmnist --pretrained
    python tools/eval.py --onnx output/repmlp_fmnist_mlp.fmnist_int8_static.onnx   # a file repmlp-export wrote
    python tools/eval.py --model repmlp_fmnist_mlp.fmnist --pretrained --int8 static    # PyTorch int8 (PT2E)
    python tools/eval.py --model repmlp_fmnist_mlp.fmnist --pretrained --form deploy --dtype bf16
"""

from __future__ import annotations

__all__ = ["main", "parse_args"]

import argparse
import json
import sys

import timm
import torch

from repmlp.cli.common import add_ema_argument, run_weights
from repmlp.convert import is_deploy_form
from repmlp.data import DATASETS, TIMM_SPECS, worker_error
from repmlp.guards import integer
from repmlp.models import model_input_size
from repmlp.onnx_io import onnx_input, onnx_metadata, onnx_predictor
from repmlp.quantize import FixedBatch, data_batches, quantize_pytorch
from repmlp.runtime import in_runtime
from repmlp.shipped import shipped_weights
from repmlp.sources import judged_record, model_source, read_record
from repmlp.training import build_eval_data, eval_data_config, evaluate
from repmlp.training.distributed import DistEnv
from repmlp.verify import DTYPES

TRANSFORM = ("input_size", "mean", "std", "crop_pct", "interpolation")  # data.* keys an ONNX file records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        "--weights",
        dest="checkpoint",
        help="train- or deploy-form file written by this package, a model folder, or a run directory of "
        "tools/train.py (its train-form file; --form deploy: its deploy-form file); the authors' with --model",
    )
    source.add_argument("--pretrained", action="store_true", help="the shipped weights of --model NAME.TAG")
    source.add_argument(
        "--onnx",
        help="an ONNX file (float32 or int8) run in onnxruntime, with the transform and dataset it records (files of "
        "tools/export_onnx.py); --model NAME[.TAG] gives them for another file",
    )
    parser.add_argument("--model", help="timm model name (default: the checkpoint's metadata)")
    parser.add_argument(
        "--model-kwargs", type=json.loads, default={}, help="JSON constructor arguments (default: the checkpoint's)"
    )
    parser.add_argument("--form", choices=("train", "deploy"), help="model form (default: the checkpoint's)")
    parser.add_argument(
        "--config",
        help="take the data section from a training config (YAML, or a run's "
        "config.json; default: the one recorded in the checkpoint)",
    )
    add_ema_argument(parser)
    parser.add_argument(
        "--dataset",
        help=f"one of {', '.join(DATASETS)} or a timm spec ({', '.join(TIMM_SPECS)}); default: the checkpoint's",
    )
    parser.add_argument(
        "--data-root", help="dataset directory (default: the recorded one; Fashion-MNIST: the Debian path)"
    )
    parser.add_argument(
        "--split", choices=("train", "val"), default="val", help="'val' is the test set of CIFAR and Fashion-MNIST"
    )
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="image folders: leave out images that cannot be decoded and count them ('skipped' in the result) "
        "instead of stopping at the first with an error naming it",
    )
    parser.add_argument("--batch-size", type=integer(1), default=500)
    parser.add_argument("--workers", type=integer(0), default=1)
    parser.add_argument("--threads", type=integer(1), help="torch CPU threads")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="compute in this dtype: the model cast once to it, inputs cast (default: the dtype a file records, "
        "else fp32)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument(
        "--int8",
        choices=("dynamic", "static"),
        help="the deploy form quantized by PyTorch's x86 int8 path (repmlp.int8.quantize_pytorch)",
    )
    parser.add_argument("--int8-batch-size", type=integer(1), default=8, help="static batch of the --int8 graph")
    parser.add_argument("--calibration", help="--int8 static: 'random' or DATASET[:ROOT] (default: the dataset)")
    parser.add_argument("--calibration-samples", type=integer(1), default=256, help="--int8 static: training images")
    args = parser.parse_args(argv)
    if args.pretrained and not args.model:
        parser.error("--pretrained needs --model NAME.TAG, e.g. repmlp_fmnist_mlp.fmnist")
    if args.onnx and args.int8:
        parser.error("--int8 quantizes a PyTorch model; an --onnx file is run as it is")
    if (args.onnx or args.int8) and args.dtype not in (None, "fp32"):
        parser.error("--dtype casts a PyTorch model; --onnx and --int8 run float32 and int8")
    if args.int8:
        args.form = "deploy"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.checkpoint = run_weights(args.checkpoint, args.form)
        if args.onnx:
            model, meta = _onnx_record(args.onnx, args.model, args.model_kwargs)
        else:
            source = model_source(
                args.model, args.checkpoint, args.pretrained, args.model_kwargs, form=args.form, use_ema=args.ema
            )
            model, meta = source.model, source.record
            print(f"model   {source.name} ({source.weights})", file=sys.stderr)
        overrides = [f"train.eval_batch_size={args.batch_size}", f"data.num_workers={args.workers}"]
        overrides += ["data.skip_bad_images=true"] if args.skip_bad_images else []
        name = args.onnx or args.checkpoint or args.model
        cfg = eval_data_config(meta, name, args.config, args.dataset, args.data_root, overrides)
        recorded, batch = onnx_input(args.onnx) if args.onnx else ({}, None)  # as trained: over the pretrained_cfg
        cfg["data"].update({k: v for k, v in recorded.items() if k in TRANSFORM and cfg["data"][k] is None})
        loader = build_eval_data(cfg, model, args.split)
        if args.onnx:  # a file onnxruntime cannot load is an error line too
            runner, form = FixedBatch(onnx_predictor(args.onnx), batch), "onnx"
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.int8:
        data = args.calibration or ":".join(filter(None, (cfg["data"]["dataset"], cfg["data"]["root"])))
        batches = data_batches(data, model, args.int8_batch_size, args.calibration_samples, "train")
        runner = FixedBatch(quantize_pytorch(model, batches[0], args.int8, batches), args.int8_batch_size)
        form = f"deploy, PyTorch int8 {args.int8}" + (f" (calibrated on {data})" if args.int8 == "static" else "")
    elif not args.onnx:
        runner, form = model, "deploy" if is_deploy_form(model) else "train"
        if (args.dtype or meta.get("dtype", "fp32")) != "fp32":  # checked against float32 with the dtype's tolerance
            dtype = args.dtype or meta["dtype"]
            example = torch.randn(2, *model_input_size(model))
            runner, form = (
                FixedBatch(in_runtime(model, "eager", example, dtype=DTYPES[dtype]), None),
                f"{form}, {dtype}",
            )
    try:
        metrics = evaluate(runner, loader, DistEnv(), progress=args.progress)
    except ValueError as err:  # an image that cannot be decoded, labels the model has no class for
        print(f"error: {worker_error(err)}", file=sys.stderr)
        return 2
    label = (args.model or meta.get("model")) if model is None else model.pretrained_cfg.get("architecture", args.model)
    print(
        json.dumps(
            {
                "model": label,
                "checkpoint": args.onnx or args.checkpoint or model.pretrained_cfg.get("file"),
                "form": form,
                "dataset": cfg["data"]["dataset"],
                "split": args.split,
                **metrics,
            }
        )
    )
    return 0


def _onnx_record(path: str, name: str | None, kwargs: dict) -> tuple[torch.nn.Module | None, dict[str, str]]:
    """For ``--onnx``: the model whose ``pretrained_cfg`` gives what the file does not record (``--model``; None
    without it), and what the file records (judged as any file's metadata) over the registered weights' record of
    ``--model NAME.TAG``."""
    recorded = onnx_metadata(path)
    if name:
        recorded.pop("model", None)  # the file's model name is only a label; the user's stands
    meta = judged_record(recorded, path)
    if not name and "input_size" not in meta:
        raise ValueError(
            f"{path} records no input transform (it was not written by tools/export_onnx.py); give --model NAME[.TAG] "
            "for the transform (and the dataset of its registered weights)"
        )
    registered = shipped_weights(name) if name else None  # NAME.TAG
    model = timm.create_model(name, **kwargs) if name else None
    return model, {**(read_record(registered) if registered else {}), **meta}


if __name__ == "__main__":
    sys.exit(main())
