"""RepMLP structural re-parameterization: blocks, exact deploy conversion, verification, timm zoo."""

__all__ = [
    "EquivalenceReport",
    "GlobalPerceptron",
    "LocalPerceptron",
    "MLPCifarNet",
    "PartitionPerceptron",
    "PureMLPNet",
    "RepMLP",
    "RepMLPNet",
    "RepMLPResNet",
    "checkpoint_filter_fn",
    "convert_to_deploy",
    "equivalent_fc3",
    "in_runtime",
    "is_deploy_form",
    "load_checkpoint",
    "randomize_bn_stats",
    "read_state_dict",
    "save_checkpoint",
    "verify_conversion",
    "verify_equivalence",
]

from .checkpoint import checkpoint_filter_fn, load_checkpoint, read_state_dict, save_checkpoint
from .convert import convert_to_deploy, is_deploy_form
from .layers import GlobalPerceptron, LocalPerceptron, PartitionPerceptron, RepMLP
from .models import MLPCifarNet, PureMLPNet, RepMLPNet, RepMLPResNet
from .quantize import equivalent_fc3
from .runtime import in_runtime
from .verify import EquivalenceReport, randomize_bn_stats, verify_conversion, verify_equivalence

__version__ = "0.1.0"
