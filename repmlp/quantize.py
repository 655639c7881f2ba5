"""Int8 deploy forms: quantization-aware training on the equivalent FC3, the authors' BN-after-FC3 fine-tuning,
post-training quantization in onnxruntime and in PyTorch, and the weight ranges that decide how well it goes.

Quantization scheme (what onnxruntime's tools and PyTorch's x86 int8 path use on CPU, and what QAT simulates):
weights int8, symmetric, one scale per output channel (per row of FC3, per (set, token) row of a shared FC3), levels
-127..127, or -64..64 with ``reduce_range`` (see :func:`weight_qmax`); activations uint8, asymmetric, one scale per
tensor (per batch for dynamic quantization, calibrated for static).
Models are quantized in the graph layout (:func:`repmlp.export.graph_layout`): FC3 as one linear layer per group,
so that each group gets its own per-channel scales.
"""
from __future__ import annotations

import copy
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from . import ops
from .layers import RepMLP
from .models.repmlpnet import RepMLPBlock

QUANTIZE_MODES = ("none", "dynamic", "static")
QAT_MODES = ("none", "equivalent_fc3", "fc3_bn")


# ----------------------------------------------------------------------------------------- equivalent FC3

def _perceptron_name(block: nn.Module) -> str:
    """The attribute holding a block's FC3 (with its BN in the train form)."""
    if isinstance(block, RepMLP):
        return "partition_perceptron"
    if isinstance(block, RepMLPBlock):
        return "channel_perceptron"
    raise TypeError(f"expected a RepMLP or RepMLPBlock, got {type(block).__name__}")


def fc3_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every RepMLP block (paper v1) and RepMLPNet block in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (RepMLP, RepMLPBlock))]


def equivalent_fc3(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """FC3 weight and bias of ``block``'s deploy form as a differentiable float64 function of its current form.

    The partition (or channel) perceptron with its BN folded plus the local perceptron as an FC matrix (paper
    Sec. 3.3, RepMLPNet's Locality Injection), from running BN statistics; gradients reach FC3, every conv
    branch and every BN's affine parameters. Shapes are those of the deploy form's ``fc3.weight`` and
    ``fc3.bias``; for a deploy-form block they are its FC3 parameters.
    """
    perceptron = getattr(block, _perceptron_name(block))
    weight, bias = perceptron.fused()
    if block.local_perceptron is not None:
        local_weight, local_bias = block.local_perceptron.fused(block.h, block.w)
        weight, bias = weight + local_weight, bias + local_bias.reshape(bias.shape)
    if isinstance(block, RepMLP):
        weight = weight.reshape(perceptron.fc3.out_features, -1)
    return weight, bias


# ----------------------------------------------------------------------------------------- fake quantization

def weight_qmax(reduce_range: bool = True) -> int:
    """Largest int8 weight level of onnxruntime's symmetric weights: 127, or 64 with ``reduce_range``.

    Reduced range (7-bit weights) is what onnxruntime advises for CPUs without VNNI (AVX2, AVX-512 without VNNI):
    their u8 x s8 kernels add pairs of products in int16, which saturates with full-range weights.
    """
    return 64 if reduce_range else 127


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI or AMX), where full-range int8 weights are safe."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def fake_quantize_weight(weight: torch.Tensor, qmax: int = 64) -> torch.Tensor:
    """Symmetric per-row fake quantization (rows: output channels, the last dim is the input), straight-through.

    Scale ``max |row| / qmax``, levels ``-qmax..qmax``, round half to even: onnxruntime's symmetric per-channel
    int8 weights (``qmax`` from :func:`weight_qmax`).
    """
    rows = weight.reshape(-1, weight.shape[-1])
    scale = rows.detach().abs().amax(1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny) / qmax
    quantized = (torch.round(rows / scale).clamp(-qmax, qmax) * scale).reshape(weight.shape)
    return weight + (quantized - weight).detach()


def fake_quantize_activation(x: torch.Tensor, qmax: int = 255) -> torch.Tensor:
    """Asymmetric per-tensor fake quantization over the tensor's own range (zero included), straight-through.

    onnxruntime's dynamic uint8 quantization of an activation; static quantization fixes the range by calibration.
    """
    lo, hi = x.detach().amin().clamp_max(0), x.detach().amax().clamp_min(0)
    scale = ((hi - lo) / qmax).clamp_min(torch.finfo(x.dtype).tiny)
    zero_point = torch.round(-lo / scale)
    quantized = (torch.round(x / scale) + zero_point).clamp(0, qmax).sub(zero_point).mul(scale)
    return x + (quantized - x).detach()


class FakeQuantFC3(nn.Module):
    """An FC3 layer (``GroupedLinear`` or ``SharedFC``) run with fake-quantized weight and input.

    Holds the layer's own ``weight`` and ``bias`` Parameters (state-dict keys unchanged) and runs the layer's
    forward on their fake-quantized values; :func:`remove_fake_quant` puts the plain layer back.
    """

    def __init__(self, fc3: nn.Module, qmax: int = 64) -> None:
        super().__init__()
        self.weight, self.bias = fc3.weight, fc3.bias
        self.qmax = qmax
        object.__setattr__(self, "layer", fc3)  # not a submodule: its parameters are ours

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {"weight": fake_quantize_weight(self.weight, self.qmax)}
        if self.bias is not None:
            params["bias"] = self.bias
        return functional_call(self.layer, params, (fake_quantize_activation(x),))

    def extra_repr(self) -> str:
        return f"{self.layer!r}, weight levels -{self.qmax}..{self.qmax}"


def remove_fake_quant(model: nn.Module) -> int:
    """Undo :func:`enable_fc3_qat` and :func:`insert_fc3_bn`'s fake quantization in place; returns how many layers."""
    count = 0
    for block in [m for m in model.modules() if "_fc3_qat" in m.__dict__]:
        del block.__dict__["forward"], block.__dict__["_fc3_qat"]
        count += 1
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, FakeQuantFC3):
                setattr(module, name, child.layer)
                count += 1
    return count


# ------------------------------------------------------------------------ QAT on the equivalent FC3 (train form)

def _equivalent_fc3_forward(block: nn.Module, *args, **kwargs) -> torch.Tensor:
    """``block``'s forward as its deploy form with the equivalent FC3, fake-quantized (see :func:`enable_fc3_qat`)."""
    shadow, name = block.__dict__["_fc3_qat"]
    weight, bias = equivalent_fc3(block)
    dtype = getattr(block, name).fc3.weight.dtype
    params = {f"{name}.fc3.weight": weight.to(dtype), f"{name}.fc3.bias": bias.to(dtype)}
    return functional_call(shadow, params, args, kwargs)


@torch.no_grad()
def _deploy_shadow(block: nn.Module, name: str, qmax: int) -> nn.Module:
    """A view of ``block`` in deploy form: its own modules, FC3 a fake-quantized deploy-form skeleton on the meta
    device (its weights are supplied at each call), no local perceptron."""
    skeleton = copy.deepcopy(getattr(block, name)).to("meta")
    skeleton.load_fused(*skeleton.fused())
    skeleton.fc3 = FakeQuantFC3(skeleton.fc3, qmax)
    shadow = object.__new__(type(block))
    shadow.__dict__.update({k: v for k, v in block.__dict__.items() if k not in ("forward", "_fc3_qat")})
    shadow.__dict__["_modules"] = {**block._modules, name: skeleton, "local_perceptron": None}
    return shadow


def enable_fc3_qat(model: nn.Module, reduce_range: bool = True) -> int:
    """Train the train form through fake-quantized equivalent FC3s (the authors' QAT advice), in place.

    Every train-form block then computes its deploy form: the equivalent FC3 (:func:`equivalent_fc3`, from the
    BNs' running statistics, which stay frozen) fake-quantized per output channel, its input per tensor, so the
    converted model meets int8 with the weights QAT trained for. Gradients reach every branch; state-dict keys do
    not change. :func:`remove_fake_quant` restores the plain train form. Returns the number of blocks.
    """
    count = 0
    for _, block in fc3_blocks(model):
        name = _perceptron_name(block)
        if getattr(block, name).bn is None or "_fc3_qat" in block.__dict__:
            continue  # deploy form (nothing to merge) or already enabled
        block.__dict__["_fc3_qat"] = (_deploy_shadow(block, name, weight_qmax(reduce_range)), name)
        block.forward = types.MethodType(_equivalent_fc3_forward, block)
        count += 1
    return count


# ------------------------------------------------------------- the authors' alternative: a BN after a deploy FC3

@torch.no_grad()
def insert_fc3_bn(model: nn.Module, batches: Iterable[torch.Tensor], reduce_range: bool = True) -> int:
    """Give every deploy-form FC3 a BatchNorm after it and fake-quantize FC3, for post-quantization fine-tuning.

    The authors' recommended route ("insert a BN after fc3 and finetune to recover the accuracy"). Each BN starts
    from the statistics of its FC3's outputs on ``batches`` with ``gamma = sqrt(var + eps)`` and ``beta = mean``,
    so the model computes the same function in eval mode and nearly so with batch statistics. Fold the BNs back
    with :func:`fold_fc3_bn` (not ``convert_to_deploy``, which treats these blocks as already converted).
    Returns the number of BNs inserted.
    """
    perceptrons = []
    for _, block in fc3_blocks(model):
        perceptron = getattr(block, _perceptron_name(block))
        if perceptron.bn is None and block.local_perceptron is None:
            fc3 = perceptron.fc3
            bn = nn.BatchNorm1d(fc3.weight.shape[0], momentum=None).to(fc3.weight)  # momentum None: a plain average
            perceptrons.append((perceptron, bn))

    def observe(bn: nn.BatchNorm1d, y: torch.Tensor) -> None:  # the perceptron's BN view: (N, C) or (N, S, h*w)
        bn(y if y.dim() == 2 else y.reshape(-1, *y.shape[-2:]))

    hooks = [p.fc3.register_forward_hook(lambda _m, _i, y, bn=bn: observe(bn, y)) for p, bn in perceptrons]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for _, bn in perceptrons:
        bn.train()
    try:
        for x in batches:
            model(x.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    for perceptron, bn in perceptrons:
        bn.weight.copy_(torch.sqrt(bn.running_var + bn.eps)), bn.bias.copy_(bn.running_mean)
        bn.momentum = 0.1
        perceptron.bn = bn.train(perceptron.training)
        perceptron.fc3 = FakeQuantFC3(perceptron.fc3, weight_qmax(reduce_range))
    return len(perceptrons)


@torch.no_grad()
def fold_fc3_bn(model: nn.Module) -> int:
    """Fold the BNs of :func:`insert_fc3_bn` back into their FC3s (running statistics) and drop the fake
    quantization: the model is a deploy form again. Returns the number of BNs folded."""
    remove_fake_quant(model)
    count = 0
    for _, block in fc3_blocks(model):
        perceptron = getattr(block, _perceptron_name(block))
        fc3 = perceptron.fc3
        if perceptron.bn is None or fc3.bias is None:
            continue  # not inserted by insert_fc3_bn (a train-form FC3 has no bias)
        rows = fc3.weight.numel() // fc3.weight.shape[-1]  # BN channel c scales rows [c * per, (c + 1) * per)
        scale, shift = (t.repeat_interleave(rows // perceptron.bn.num_features) for t in ops.bn_affine(perceptron.bn))
        weight, bias = ops.fuse_bn(fc3.weight.reshape(rows, -1), fc3.bias.reshape(rows), scale, shift)
        perceptron.load_fused(weight.reshape(fc3.weight.shape), bias.reshape(fc3.bias.shape))
        count += 1
    return count


def prepare_qat(model: nn.Module, mode: str, batches: Iterable[torch.Tensor] = (), reduce_range: bool = True) -> int:
    """Set up a QAT mode in place: 'equivalent_fc3' (a train form, :func:`enable_fc3_qat`) or 'fc3_bn' (a deploy
    form, :func:`insert_fc3_bn` initialised on ``batches``); 'none' does nothing. Returns the layers prepared."""
    if mode not in QAT_MODES:
        raise ValueError(f"QAT mode must be one of {QAT_MODES}, got {mode!r}")
    if mode == "none":
        return 0
    count = (enable_fc3_qat(model, reduce_range) if mode == "equivalent_fc3"
             else insert_fc3_bn(model, batches, reduce_range))
    if not count:
        form = "train" if mode == "equivalent_fc3" else "deploy"
        raise ValueError(f"QAT mode {mode!r} needs a {form}-form model with RepMLP blocks; none found to prepare")
    return count


def finish_qat(model: nn.Module) -> nn.Module:
    """The plain float model after QAT, in place: fake quantization removed, inserted FC3 BNs folded."""
    fold_fc3_bn(model)
    return model


# ------------------------------------------------------------------------------------------ calibration data

def data_batches(spec: str, model: nn.Module, batch_size: int, samples: int, split: str = "train",
                 seed: int = 0) -> list[torch.Tensor]:
    """``samples`` inputs (whole batches of ``batch_size``) for calibration or checks, from a dataset spec.

    ``spec``: ``'random'`` (seeded standard-normal inputs of the model's size) or ``DATASET[:ROOT]`` with a dataset
    name the training configs take (``fashion_mnist``, ``cifar10:data/cifar-10-batches-py``, ``imagefolder:DIR``);
    images get the model's evaluation transform and are drawn at random (seeded) from ``split``.
    """
    from timm.data import resolve_data_config

    from .benchmark import model_input_size
    from .data import DATASETS, build_dataset, build_transform

    count = max(1, samples // batch_size) * batch_size
    gen = torch.Generator().manual_seed(seed)
    if spec == "random":
        return list(torch.randn((count, *model_input_size(model)), generator=gen).split(batch_size))
    name, _, root = spec.partition(":")
    if name not in DATASETS:
        raise ValueError(f"calibration data {spec!r}: expected 'random' or DATASET[:ROOT] with DATASET one of "
                         f"{DATASETS}, e.g. 'fashion_mnist' or 'imagefolder:data/imagenet'")
    cfg = resolve_data_config({}, model=model)
    dataset = build_dataset(name, split, root or None, transform=build_transform(
        False, cfg["input_size"], cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"]))
    if len(dataset) < count:
        raise ValueError(f"calibration data {spec!r} has {len(dataset)} {split} images, fewer than the {count} asked")
    images = torch.stack([dataset[i][0] for i in torch.randperm(len(dataset), generator=gen)[:count].tolist()])
    return list(images.split(batch_size))


def default_calibration(model_name: str) -> str:
    """The dataset a shipped model was trained on (``pretrained/manifest.json``), else ``'random'``."""
    from .zoo import shipped_models

    base, _, tag = model_name.partition(".")
    entry = next((e for e in shipped_models() if e["model"] == base and (not tag or e["tag"] == tag)), None)
    return entry["dataset"] if entry and tag else "random"


# ------------------------------------------------------------------------------------------------ onnxruntime

def ort_session(path: str | Path, threads: int | None = None):
    """A CPU onnxruntime session whose threads sleep between runs (they spin by default, which starves other
    processes on a shared machine and skews interleaved timings)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_onnx(src: str | Path, dst: str | Path, mode: str, calibration: Iterable[torch.Tensor] = (),
                  reduce_range: bool = True) -> None:
    """Write the int8 version of the float32 ONNX file ``src`` to ``dst`` with onnxruntime's quantization tools.

    ``dynamic``: weights int8 per output channel, activations quantized per batch at run time (MatMulInteger,
    ConvInteger). ``static``: activation ranges calibrated (min/max) on ``calibration`` inputs, QDQ format
    (onnxruntime fuses it into QLinear kernels; its QOperator format gave wrong outputs for these graphs).
    """
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in ("dynamic", "static"):
        raise ValueError(f"quantize mode must be 'dynamic' or 'static', got {mode!r}")
    common = dict(per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8)
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process: shape inference is done at export
    if mode == "dynamic":
        quantize_dynamic(str(src), str(dst), **common)
        return

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            x = next(self.batches, None)
            return None if x is None else {"input": x.numpy()}

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    calibrate_method=CalibrationMethod.MinMax, **common)


@dataclass
class Int8Check:
    """Agreement of an int8 model with its float32 form on the same inputs."""

    argmax_agreement: float
    max_rel_err: float
    samples: int
    data: str

    def __str__(self) -> str:
        return (f"int8 vs float32 on {self.samples} {self.data} inputs: argmax agreement {self.argmax_agreement:.2%}, "
                f"max rel err {self.max_rel_err:.2e}")


def compare_outputs(reference, candidate, batches: Iterable[torch.Tensor], data: str) -> Int8Check:
    """Run two predictors (tensor -> logits) on ``batches``: argmax agreement and max relative logit error."""
    agree = seen = 0
    max_abs = scale = 0.0
    for x in batches:
        ref, out = reference(x).double(), candidate(x).double()
        agree += (ref.argmax(-1) == out.argmax(-1)).sum().item()
        seen += ref.shape[0]
        max_abs, scale = max(max_abs, (ref - out).abs().max().item()), max(scale, ref.abs().max().item())
    return Int8Check(agree / max(seen, 1), max_abs / max(scale, 1e-300), seen, data)


def onnx_predictor(path: str | Path, threads: int | None = None):
    """``x -> logits`` through an onnxruntime session of ``path`` (input named ``input``)."""
    session = ort_session(path, threads)
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


# ----------------------------------------------------------------------------------------------- PyTorch int8

def quantize_pytorch(model: nn.Module, example: torch.Tensor, mode: str, calibration: Iterable[torch.Tensor] = (),
                     reduce_range: bool | None = None, compile: bool = True):
    """An int8 version of a deploy-form model for the CPU: PT2E quantization (torchao) with the x86 inductor quantizer.

    The model is exported (``torch.export``, fixed to ``example``'s shape) in the graph layout, so every FC3
    group, FC and conv is a linear or conv node the quantizer annotates (weights int8 per output channel,
    activations uint8 per tensor: calibrated for ``static``, per batch for ``dynamic``); ``compile`` lowers it with
    inductor (freezing on) to oneDNN int8 kernels, otherwise the reference (simulated) int8 module is returned.
    ``reduce_range`` (default: on CPUs without VNNI) keeps activations to 7 bits, this quantizer's remedy for the
    saturation of u8 x s8 int16 sums.
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from .export import graph_layout

    if mode not in ("dynamic", "static"):
        raise ValueError(f"quantize mode must be 'dynamic' or 'static', got {mode!r}")
    reduce_range = not cpu_has_vnni() if reduce_range is None else reduce_range
    with torch.no_grad(), graph_layout(model.eval()):
        exported = torch.export.export(model, (example,)).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config(
        is_dynamic=mode == "dynamic", reduce_range=reduce_range))
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in (calibration if mode == "static" else [example]):
            prepared(x)
    converted = convert_pt2e(prepared)
    return torch.compile(converted, options={"freezing": True}) if compile else converted
