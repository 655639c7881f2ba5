"""Train a model from a YAML recipe; single process, or ``torchrun`` on one node or several.

Examples:
    python tools/train.py --config configs/fmnist_repmlp.yaml
    python tools/train.py --config configs/fmnist_repmlp.yaml --set train.epochs=2 --optimizer.lr 0.1
    python tools/train.py --config configs/fmnist_repmlp.yaml --resume      # continue a killed run
    torchrun --nproc_per_node 2 tools/train.py --config configs/cifar10_mlp.yaml
    # on each node (the output directory on a shared filesystem; --resume on every node after a failure):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint NODE0:29400 --rdzv-id run1 \
        tools/train.py --config configs/imagenet_repmlp_res50.yaml --output /shared/runs/res50
"""

from __future__ import annotations

import argparse
import sys

from repmlp.data import worker_error
from repmlp.training import load_config, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml); omitted: defaults only")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. train.epochs=2 (repeatable)",
    )
    parser.add_argument("--output", help="output directory (same as --set train.output_dir=...)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="STATE",
        help="continue from <output_dir>/last_state.safetensors, or from the given training state file",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an output directory that holds an earlier run, deleting its files",
    )
    args, extra = parser.parse_known_args(argv)
    try:
        overrides = list(args.overrides) + dotted_flags(extra)
    except ValueError as err:
        parser.error(str(err))
    if args.output:
        overrides.append(f"train.output_dir={args.output}")
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as err:
        parser.error(str(err))
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        print(f"error: {worker_error(err)}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        return 130
    return 0 if summary.get("equivalence", {}).get("passed", True) else 1


def dotted_flags(items: list[str]) -> list[str]:
    """``--train.epochs=2`` and ``--train.epochs 2`` as overrides 'train.epochs=2'."""
    overrides, items = [], list(items)
    while items:
        item = items.pop(0)
        if not item.startswith("--") or "." not in item.split("=")[0]:
            raise ValueError(f"unrecognised argument {item!r}; use --set section.key=value or --section.key value")
        if "=" in item:
            overrides.append(item[2:])
        elif items and not items[0].startswith("--"):
            overrides.append(f"{item[2:]}={items.pop(0)}")
        else:
            raise ValueError(f"{item} needs a value: {item} VALUE or {item}=VALUE")
    return overrides


if __name__ == "__main__":
    sys.exit(main())
