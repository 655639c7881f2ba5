"""Write a trained checkpoint as a shipped model folder (config.json, model.safetensors; see repmlp.shipped).

    python tools/ship_model.py --model repmlp_fmnist_mlp.fmnist --checkpoint runs/fmnist/model_train.safetensors

The checkpoint (train form, ours or an older key layout) is loaded strictly into the registered model, saved
in the current layout with its training metadata kept, and config.json is written from the registry's
pretrained_cfg with the file's sha256. The folder's README.md model card is written by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm

import repmlp
from repmlp.checkpoint import (
    read_metadata,
    write_folder,
)
from repmlp.guards import add_overwrite_argument, check_outputs
from repmlp.shipped import WEIGHTS_NAME, weights_dir, weights_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="timm name with tag, e.g. repmlp_fmnist_mlp.fmnist")
    parser.add_argument("--checkpoint", required=True, help="train-form checkpoint to ship")
    parser.add_argument("--output", help="folder to write (default: <weights dir>/<model>)")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    output = Path(args.output or weights_dir() / args.model)
    try:
        checkpoint = weights_file(args.checkpoint)  # a model folder names its weights file
        files = {f"--output {name}": output / name for name in (WEIGHTS_NAME, "config.json")}
        check_outputs(files, [args.checkpoint, checkpoint], args.overwrite)  # before any work: never over the input
        model = repmlp.load_checkpoint(timm.create_model(args.model), checkpoint)
        keep = {
            k: v
            for k, v in read_metadata(checkpoint).items()
            if k not in ("model", "form", "format", "num_classes", "model_kwargs")
        }
        folder = write_folder(model, output, metadata=keep)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {folder / WEIGHTS_NAME} and {folder / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
