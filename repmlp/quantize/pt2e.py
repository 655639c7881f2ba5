"""PyTorch's x86 int8 path: PT2E quantization (torchao) of an exported graph in the graph layout, compiled by
inductor to oneDNN int8 kernels."""

from __future__ import annotations

__all__ = ["FixedBatch", "compile_frozen", "export_graph", "quantize_pytorch"]

from collections.abc import Iterable

import torch
from torch import nn

from ..layers import graph_layout
from .scheme import resolve_reduce_range


def quantize_pytorch(
    model: nn.Module,
    example: torch.Tensor,
    mode: str,
    calibration: Iterable[torch.Tensor] = (),
    reduce_range: bool | None = None,
    compile: bool = True,
):
    """An int8 version of a deploy-form model for the CPU: PT2E quantization (torchao) with the x86 inductor quantizer.

    The model is exported (``torch.export``, fixed to ``example``'s shape) in the graph layout, so every FC3
    group, FC and conv is a linear or conv node the quantizer annotates (weights int8 per output channel,
    activations uint8 per tensor: calibrated for ``static``, per batch for ``dynamic``); ``compile`` lowers it with
    inductor (freezing on) to oneDNN int8 kernels, otherwise the reference (simulated) int8 module is returned.
    ``reduce_range`` (default: on CPUs without VNNI) keeps activations to 7 bits, this quantizer's remedy for the
    saturation of u8 x s8 int16 sums.
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86  # the int8 extra: imported when used
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if mode not in ("dynamic", "static"):
        raise ValueError(f"quantize mode must be 'dynamic' or 'static', got {mode!r}")
    reduce_range = resolve_reduce_range(reduce_range)

    class Quantizer(x86.X86InductorQuantizer):
        """Convs quantized on their own, not fused with a following residual add: inductor's int8 conv + add
        fusion asserts when the residual is a view (RepMLPNet's units, torch 2.14)."""

        def _annotate_conv2d_binary_unary(self, *args, **kwargs) -> None:
            pass

        def _annotate_conv2d_binary(self, *args, **kwargs) -> None:
            pass

    quantizer = Quantizer().set_global(
        x86.get_default_x86_inductor_quantization_config(is_dynamic=mode == "dynamic", reduce_range=reduce_range)
    )
    prepared = prepare_pt2e(export_graph(model, example), quantizer)
    with torch.no_grad():
        for x in calibration if mode == "static" else [example]:
            prepared(x)
    converted = convert_pt2e(prepared)
    return compile_frozen(converted, example) if compile else converted


def export_graph(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``torch.export`` of ``model`` in the graph layout, fixed to ``example``'s shape (as an ``nn.Module``)."""
    with torch.no_grad(), graph_layout(model.eval()):
        return torch.export.export(model, (example,)).module()


def compile_frozen(graph: nn.Module, example: torch.Tensor):
    """``torch.compile`` (inductor) of an exported graph, compiled now on ``example`` with its weights frozen into
    the graph (prepacked for oneDNN)."""
    compiled = torch.compile(graph)
    # freezing as a torch.compile option instead fails on quantized convs in torch 2.14
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        compiled(example)
    return compiled


class FixedBatch(nn.Module):
    """A ``tensor -> logits`` callable fixed to one batch size (an onnxruntime session, a compiled int8 graph) as a
    module that takes any batch: inputs run in chunks of ``batch_size``, the last one zero-padded; a callable that
    takes any batch (``batch_size`` None) is called as it is."""

    def __init__(self, predict, batch_size: int | None) -> None:
        super().__init__()
        object.__setattr__(self, "predict", predict)  # not a submodule: exported graphs refuse train()/eval()
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_size is None:
            return self.predict(x)
        outs = []
        for chunk in x.split(self.batch_size):
            n = chunk.shape[0]
            if n < self.batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros(self.batch_size - n, *chunk.shape[1:])])
            outs.append(self.predict(chunk)[:n])
        return torch.cat(outs)
