"""Convert a train-form checkpoint to its deploy form, prove the two agree, write it atomically.

Where the model comes from (repmlp.sources, the rule of every tool): --weights FILE, or --model NAME[.TAG]
--pretrained (registered weights), else seeded random weights with randomised BatchNorm statistics, labelled as
such. With no arguments: the model shipped with the package, repmlp_fmnist_mlp.fmnist --pretrained.

--dtype bf16 (or fp16) writes the deploy form in that dtype: converted from a float64 copy and cast once, then
checked against the float32 train form with that dtype's tolerance (repmlp.verify.TOLERANCES); the file records its
dtype, which tools/eval.py then runs it in. Example:
    python tools/convert_deploy.py --dtype bf16 --output output/fmnist_deploy_bf16.safetensors
"""

from __future__ import annotations

__all__ = ["load_train_model", "main", "parse_args"]

import argparse
import sys
import time
import warnings

import torch

import repmlp
from repmlp.cli.common import add_model_arguments
from repmlp.flops import count_macs, count_params
from repmlp.guards import add_overwrite_argument, check_outputs, integer
from repmlp.models import model_input_size
from repmlp.preprocess import INPUT_KEYS, LABEL_KEY
from repmlp.quantize import format_ranges, weight_ranges
from repmlp.sources import ModelSource, deploy_record, model_source
from repmlp.verify import DTYPES

warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)

DEFAULT = "repmlp_fmnist_mlp.fmnist"  # with --pretrained: the shipped model
SUFFIXES = {"--output": (".safetensors",)}  # what save_checkpoint writes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, f"{DEFAULT} --pretrained, the shipped model", "train-form weights file or model folder")
    p.add_argument("--output", help="deploy-form .safetensors to write (default: output/<model>_deploy.safetensors)")
    add_overwrite_argument(p)
    p.add_argument("--batch-size", type=integer(1), default=2, help="random inputs for the check (default 2)")
    p.add_argument("--seed", type=integer(0), default=0, help="seed of the random model and inputs")
    p.add_argument("--no-float64", action="store_true", help="skip the float64 check of the conversion")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the deploy form written (default fp32)")
    p.add_argument(
        "--ranges",
        action="store_true",
        help="print each deploy-form layer's weight range and int8 noise (which layers int8 hurts most)",
    )
    return p.parse_args(argv)


def load_train_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str, ModelSource]:
    """The train-form model, its name (for file names) and where its weights come from."""
    default = args.model is None and args.weights is None
    source = model_source(
        args.model or (None if args.weights else DEFAULT),
        args.weights,
        args.pretrained or default,
        args.model_kwargs,
        form="train" if not args.weights else None,
        seed=args.seed,
        use_ema=args.ema,
    )
    name = (source.model.pretrained_cfg or {}).get("architecture") or source.name.replace(":", "_")
    return source.model, name, source


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_outputs({"--output": args.output}, [args.weights], args.overwrite, SUFFIXES)  # before any reading
        model, name, source = load_train_model(args)
        if repmlp.is_deploy_form(model):
            raise ValueError(f"{args.weights or name} is already in deploy form; nothing to convert")
        repmlp.convert.check_convertible(model)  # NaN weights, negative variances: refused before converting
        output = args.output or f"output/{name}_deploy.safetensors"
        output = check_outputs({"--output": output}, [args.weights, source.path], args.overwrite, SUFFIXES)["--output"]
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.eval()
    input_size = model_input_size(model)  # the model's own channels and size (a fine-tune may differ from its cfg)
    print(f"model   {name} ({source.weights})")

    start = time.perf_counter()
    deploy = repmlp.convert_to_deploy(model, dtype=DTYPES[args.dtype])
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
    meta = {**deploy_record(source, model, args.model_kwargs), "dtype": args.dtype}
    meta.update({k: v for k, v in source.record.items() if k in (LABEL_KEY, *INPUT_KEYS)})  # as trained
    repmlp.save_checkpoint(deploy, output, model_name=name, form="deploy", metadata=meta)
    print(f"wrote   {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
