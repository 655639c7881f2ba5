"""What several tools share: the arguments that name a model and its weights, and a training run's directory named
where a weights file is expected."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["RUN_WEIGHTS", "add_ema_argument", "add_model_arguments", "run_weights"]

#: The weights files ``repmlp-train`` writes in its output directory, by form.
RUN_WEIGHTS = {"train": "model_train.safetensors", "deploy": "model_deploy.safetensors"}


def run_weights(path: str | Path | None, form: str | None = None) -> str | None:
    """``path`` itself, or for a directory ``repmlp-train`` wrote, its weights file of ``form`` (default: the train
    form's, else the deploy form's, as a run in QAT's fc3_bn mode writes only that).

    Raises:
        ValueError: a run directory without the file of the asked form (the message lists what it holds).
    """
    if path is None or not Path(path).is_dir():
        return None if path is None else str(path)
    folder = Path(path)
    if not any((folder / name).is_file() for name in RUN_WEIGHTS.values()):
        return str(path)  # a model folder (config.json + weights) or another directory: the loader decides
    for name in [RUN_WEIGHTS[form]] if form else list(RUN_WEIGHTS.values()):
        if (folder / name).is_file():
            return str(folder / name)
    held = sorted(p.name for p in folder.iterdir())
    raise ValueError(f"run directory {folder} holds no {RUN_WEIGHTS[form]} (it holds {held})")


def add_model_arguments(parser: argparse.ArgumentParser, default: str, weights_help: str = "") -> None:
    """``--model``, ``--pretrained``, ``--weights`` and ``--model-kwargs``, as every tool takes them."""
    parser.add_argument("--model", help=f"timm name NAME[.TAG] or package.module:factory (default: {default})")
    parser.add_argument(
        "--pretrained", action="store_true", help="load the registered weights of --model NAME[.TAG] (as timm does)"
    )
    parser.add_argument(
        "--weights",
        help=weights_help
        or "weights file or model folder: ours (model, classes and arguments read from it) or a foreign layout "
        "(needs --model)",
    )
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help="JSON constructor arguments, e.g. '{\"num_classes\": 10}' (default: what the weights record)",
    )
    add_ema_argument(parser)


def add_ema_argument(parser: argparse.ArgumentParser) -> None:
    """``--ema``: load a trainer checkpoint's EMA weights (as timm's scripts' ``--use-ema``, which it also takes)."""
    parser.add_argument(
        "--ema",
        "--use-ema",
        dest="ema",
        action="store_true",
        help="load the EMA weights of a trainer's checkpoint (state_dict_ema, e.g. timm train.py's); default: its "
        "state_dict",
    )
