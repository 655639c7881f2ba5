#!/usr/bin/env python
"""Convert a train-form checkpoint to its deploy form, prove the two agree, write it atomically.

With no arguments: the model shipped in pretrained/ (see pretrained/manifest.json); if none is shipped,
a seeded random model with randomised BatchNorm statistics, labelled as such.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)

import timm  # noqa: E402
import torch  # noqa: E402

import repmlp  # noqa: E402
from repmlp.flops import count_macs, count_params  # noqa: E402
from repmlp.int8 import format_ranges, weight_ranges  # noqa: E402
from repmlp.shipped import shipped_models  # noqa: E402
from repmlp.verify import randomize_bn_stats  # noqa: E402

RANDOM_DEFAULT = "repmlp_res50_light_224"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"timm model name (default: the shipped model, else a random {RANDOM_DEFAULT})")
    p.add_argument("--weights", help="train-form checkpoint: ours (.safetensors) or the authors' (.pth)")
    p.add_argument("--output", help="deploy-form .safetensors to write (default: output/<model>_deploy.safetensors)")
    p.add_argument("--batch-size", type=int, default=2, help="random inputs for the check (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model and inputs")
    p.add_argument("--no-float64", action="store_true", help="skip the float64 check of the conversion")
    p.add_argument(
        "--ranges",
        action="store_true",
        help="print each deploy-form layer's weight range and int8 noise (which layers int8 hurts most)",
    )
    return p.parse_args(argv)


def load_train_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str, str]:
    """The train-form model, its timm name and a label saying where its weights come from."""
    shipped = [e for e in shipped_models() if e["form"] == "train"]
    if args.weights:
        if not args.model:
            raise SystemExit("--weights needs --model (the timm name the checkpoint was trained as)")
        model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=args.weights))
        return model, args.model, f"weights {args.weights}"
    entry = next((e for e in shipped if not args.model or e["model"] == args.model), None)
    if entry:
        name = f"{entry['model']}.{entry['tag']}"
        return timm.create_model(name, pretrained=True), entry["model"], f"shipped weights {name}"
    name = args.model or RANDOM_DEFAULT
    torch.manual_seed(args.seed)
    model = randomize_bn_stats(timm.create_model(name), args.seed)
    return model, name, f"RANDOM weights (seed {args.seed}) with randomised BN statistics, no trained model"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, name, source = load_train_model(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.eval()
    if repmlp.is_deploy_form(model):
        raise SystemExit(f"{name}: the model is already in deploy form; nothing to convert")
    input_size = tuple(model.pretrained_cfg["input_size"])
    output = Path(args.output or f"output/{name}_deploy.safetensors")
    print(f"model   {name} ({source})")

    start = time.perf_counter()
    deploy = repmlp.convert_to_deploy(model)
    seconds = time.perf_counter() - start

    gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn((args.batch_size, *input_size), generator=gen)
    reports = [repmlp.verify_equivalence(model, deploy, inputs)]
    if not args.no_float64:  # the conversion's own error, on a float64 copy (the model itself is not cast)
        reports.append(repmlp.verify_conversion(model, torch.float64, inputs=inputs))

    rows = [
        ("params", count_params(model), count_params(deploy)),
        ("MACs", count_macs(model, input_size), count_macs(deploy, input_size)),
    ]
    print(f"{'':8}{'train form':>16}{'deploy form':>16}")
    for label, before, after in rows:
        print(f"{label:8}{before / 1e6:>15.3f}M{after / 1e6:>15.3f}M")
    print(f"convert {seconds:.3f} s")
    for report in reports:
        print(f"check   {report}")
    if args.ranges:
        print(format_ranges(weight_ranges(deploy)))
    if not all(r.passed for r in reports):
        print(f"NOT written: the deploy form does not match the train form ({output})", file=sys.stderr)
        return 1
    repmlp.save_checkpoint(deploy, output, model_name=name, form="deploy", metadata={"source": source})
    print(f"wrote   {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
