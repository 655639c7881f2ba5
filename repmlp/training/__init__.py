"""Training on real data: configs, the training run (single process or torchrun), evaluation."""
from .config import DEFAULTS, load_config
from .engine import compare_forms, evaluate
from .loop import train

__all__ = ["DEFAULTS", "compare_forms", "evaluate", "load_config", "train"]
