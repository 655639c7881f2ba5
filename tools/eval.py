#!/usr/bin/env python
"""Top-1, top-5 and loss of a train- or deploy-form checkpoint on a dataset.

Examples:
    python tools/eval.py --checkpoint pretrained/repmlp_fmnist_mlp.fmnist.safetensors --dataset fashion_mnist
    python tools/eval.py --checkpoint runs/fmnist/model_train.safetensors --form deploy --dataset fashion_mnist
    python tools/eval.py --model repmlp_fmnist_mlp.fmnist --pretrained --dataset fashion_mnist
    python tools/eval.py --onnx output/repmlp_fmnist_mlp.fmnist_int8_static.onnx --model repmlp_fmnist_mlp.fmnist
    python tools/eval.py --model repmlp_fmnist_mlp.fmnist --pretrained --int8 static     # PyTorch int8 (PT2E)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402

from repmlp.convert import is_deploy_form  # noqa: E402
from repmlp.data import DATASETS  # noqa: E402
from repmlp.int8 import FixedBatch, data_batches, onnx_batch_size, onnx_predictor, quantize_pytorch  # noqa: E402
from repmlp.training import build_eval_data, evaluate, load_config, model_from_checkpoint  # noqa: E402
from repmlp.training.distributed import DistEnv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="safetensors file written by tools/train.py (or shipped)")
    source.add_argument("--pretrained", action="store_true", help="the shipped weights of --model NAME.TAG")
    source.add_argument(
        "--onnx", help="an ONNX file (float32 or int8) run in onnxruntime; --model gives its data transform"
    )
    parser.add_argument("--model", help="timm model name (default: the checkpoint's metadata)")
    parser.add_argument("--form", choices=("train", "deploy"), help="model form (default: the checkpoint's)")
    parser.add_argument("--config", help="take the data section from a training config (YAML, or a run's config.json)")
    parser.add_argument("--dataset", choices=DATASETS, help="dataset (default: the config's, else fashion_mnist)")
    parser.add_argument("--data-root", help="dataset directory (Fashion-MNIST default: the Debian path)")
    parser.add_argument(
        "--split", choices=("train", "val"), default="val", help="'val' is the test set of CIFAR and Fashion-MNIST"
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--int8",
        choices=("dynamic", "static"),
        help="the deploy form quantized by PyTorch's x86 int8 path (repmlp.int8.quantize_pytorch)",
    )
    parser.add_argument("--int8-batch-size", type=int, default=8, help="static batch of the --int8 graph")
    parser.add_argument("--calibration", help="--int8 static: 'random' or DATASET[:ROOT] (default: --dataset)")
    parser.add_argument("--calibration-samples", type=int, default=256, help="--int8 static: training images")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.onnx or args.int8:
        args.form = "deploy"
    if args.onnx:
        if not args.model or args.int8:
            parser.error("--onnx needs --model NAME (its input size, mean and std) and takes no --int8")
        model = timm.create_model(args.model)  # its pretrained_cfg only: the file holds the weights
    elif args.pretrained:
        if not args.model:
            parser.error("--pretrained needs --model NAME.TAG, e.g. repmlp_fmnist_mlp.fmnist")
        model = timm.create_model(args.model, pretrained=True, deploy=args.form == "deploy")
    else:
        model = model_from_checkpoint(args.checkpoint, args.model, args.form)
    cfg = load_config(args.config, [f"train.eval_batch_size={args.batch_size}", f"data.num_workers={args.workers}"])
    if args.dataset or not args.config:
        cfg["data"]["dataset"], cfg["data"]["root"] = args.dataset or "fashion_mnist", args.data_root
    loader = build_eval_data(cfg, model, args.split)
    form = "deploy" if is_deploy_form(model) else "train"
    if args.onnx:
        predictor, form = FixedBatch(onnx_predictor(args.onnx), onnx_batch_size(args.onnx)), "onnx"
    elif args.int8:
        data = args.calibration or ":".join(filter(None, (cfg["data"]["dataset"], cfg["data"]["root"])))
        batches = data_batches(data, model, args.int8_batch_size, args.calibration_samples, "train")
        predictor = FixedBatch(quantize_pytorch(model, batches[0], args.int8, batches), args.int8_batch_size)
        form = f"deploy, PyTorch int8 {args.int8}" + (f" (calibrated on {data})" if args.int8 == "static" else "")
    metrics = evaluate(predictor if args.onnx or args.int8 else model, loader, DistEnv())
    print(
        json.dumps(
            {
                "model": model.pretrained_cfg.get("architecture", args.model),
                "checkpoint": args.onnx or args.checkpoint or model.pretrained_cfg.get("file"),
                "form": form,
                "dataset": cfg["data"]["dataset"],
                "split": args.split,
                **metrics,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
