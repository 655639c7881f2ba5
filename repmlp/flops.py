"""Parameter and multiply-accumulate counts (fvcore), as the paper counts them: conv and FC layers only."""

from __future__ import annotations

__all__ = ["count_macs", "count_params"]

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import matmul_flop_jit
from torch import nn

_IGNORED = (
    "aten::batch_norm",
    "aten::add",
    "aten::add_",
    "aten::mul",
    "aten::mul_",
    "aten::relu",
    "aten::relu_",
    "aten::gelu",
    "aten::sigmoid",
    "aten::max_pool2d",
    "aten::avg_pool2d",
    "aten::adaptive_avg_pool2d",
    "aten::mean",
    "aten::div",
    "aten::sum",
    "aten::softmax",
)


def _baddbmm_flop_jit(inputs, outputs):
    return matmul_flop_jit(inputs[1:3], outputs)


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 1) -> int:
    """Multiply-accumulates of conv, FC and matmul ops for one forward pass (fvcore's "flops")."""
    param = next(model.parameters())
    x = torch.zeros((batch_size, *input_size), dtype=param.dtype, device=param.device)
    was_training = model.training
    analysis = FlopCountAnalysis(model.eval(), x)
    analysis.set_op_handle("aten::baddbmm", _baddbmm_flop_jit)
    analysis.set_op_handle(**{op: None for op in _IGNORED})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    try:
        return int(analysis.total())
    finally:
        model.train(was_training)
