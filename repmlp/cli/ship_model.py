"""Write a trained checkpoint as a shipped model folder (config.json, model.safetensors; see repmlp.shipped).

    python tools/ship_model.py --model repmlp_fmnist_mlp.fmnist --checkpoint runs/fmnist/model_train.safetensors

The checkpoint (train form, ours or an older key layout) is loaded strictly into the registered model, saved
in the current layout with its training metadata kept, and config.json is written from the registry's
pretrained_cfg with the file's sha256. The folder's README.md model card is written by hand.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import sys
from pathlib import Path

import timm

import repmlp
from repmlp.checkpoint import write_folder
from repmlp.guards import add_overwrite_argument, check_outputs
from repmlp.shipped import WEIGHTS_NAME, weights_dir
from repmlp.weights_file import WeightsFile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="timm name with tag, e.g. repmlp_fmnist_mlp.fmnist")
    parser.add_argument("--checkpoint", required=True, help="train-form checkpoint to ship")
    parser.add_argument("--output", help="folder to write (default: <weights dir>/<model>)")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    output = Path(args.output or weights_dir() / args.model)
    try:
        checkpoint = WeightsFile.open(args.checkpoint)  # read once; a model folder names its weights file
        files = {f"--output {name}": output / name for name in (WEIGHTS_NAME, "config.json")}
        check_outputs(files, [args.checkpoint, checkpoint.path], args.overwrite)  # before any work: never over it
        model = repmlp.load_checkpoint(timm.create_model(args.model), checkpoint)
        drop = ("model", "form", "format", "num_classes", "model_kwargs")
        keep = {k: v for k, v in checkpoint.metadata.items() if k not in drop}
        folder = write_folder(model, output, metadata=keep)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {folder / WEIGHTS_NAME} and {folder / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
