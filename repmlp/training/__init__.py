"""Training on real data: configs, the training run (single process or torchrun), evaluation."""

from ..sources import model_from_checkpoint
from .builders import build_eval_data, eval_data_config
from .config import DEFAULTS, load_config
from .engine import compare_forms, evaluate
from .loop import train

__all__ = [
    "DEFAULTS",
    "build_eval_data",
    "compare_forms",
    "eval_data_config",
    "evaluate",
    "load_config",
    "model_from_checkpoint",
    "train",
]
