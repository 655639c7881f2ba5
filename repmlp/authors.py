"""Everything about the authors' code (DingXiaoH/RepMLP): their checkpoint key layouts and emulations of their
inference forms.

Key layouts (train and inference forms) are mapped to ours by pure renames, each family's listed as
:class:`KeyLayout` entries detected by a marker key: the authors' and, for RepMLPNet, mmpretrain's (its files are
the authors' release under mmpretrain's module names). The RepMLPNet inference forms ("locality injection": FC3
with a bias, every other BN kept) are partly re-parameterized states that :func:`repmlp.load_checkpoint` matches
structurally, so nothing here converts weights.

The emulations run our weights op for op the way the authors' inference code runs them (6-D partition
permutes, FC3 as a grouped 1x1 conv over C*h*w channels), and convert the way their conversion does
(:func:`authors_convert`). They compute the same function as our deploy forms and exist to be raced against in
:mod:`repmlp.benchmark`; their code itself is not used.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_Renames = tuple[tuple[str, str | Callable[[re.Match], str]], ...]

# ------------------------------------------------------------------------------------------ key layouts

#: RepMLP v1 block internals (``fc1_fc2``, ``avg.bn``, ``fc3`` as a 1x1 conv, ``fc3_bn``); ``repconv{k}`` is
#: handled by :func:`block_keys_to_ours`, which knows the block's kernel sizes.
_V1_BLOCK = (
    ("avg.bn.", "global_perceptron.bn."),
    ("fc1_fc2.fc1.", "global_perceptron.fc1."),
    ("fc1_fc2.fc2.", "global_perceptron.fc2."),
    ("fc3_bn.", "partition_perceptron.bn."),
    ("fc3.", "partition_perceptron.fc3."),
)

_V1_RESNET: _Renames = (
    (r"^stage0\.0\.", "stem."),
    (r"^stage(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}."),
    (r"\.(light|btnk)_(conv\d|repmlp)\.", r".\2."),
    (r"^linear\.", "head.fc."),
)

_REPMLPNET: _Renames = (
    (r"^conv_embedding\.", "stem."),
    (r"^embeds\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.prebn1\.", ".norm1."),
    (r"\.prebn2\.", ".norm2."),
    (r"\.repmlp_block\.gp\.", ".repmlp.global_perceptron."),
    (r"\.repmlp_block\.fc3_bn\.", ".repmlp.channel_perceptron.bn."),
    (r"\.repmlp_block\.fc3\.", ".repmlp.channel_perceptron.fc3."),
    (r"\.ffn_block\.ffn_(fc\d)\.", r".ffn.\1."),
    (r"^head_norm\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
)

#: mmpretrain's RepMLPNet (``ImageClassifier``: ``backbone.``, ``head.fc``) to the authors' names, whose table then
#: leads to ours. Their deploy form (``switch_to_deploy``) is the authors' locality-injected form under these names.
_MMPRETRAIN_REPMLPNET: _Renames = (
    (r"^backbone\.patch_embed\.projection\.", "conv_embedding.conv."),
    (r"^backbone\.patch_embed\.norm\.", "conv_embedding.bn."),
    (r"^backbone\.downsample_layers\.(\d+)\.", r"embeds.\1."),
    (r"^backbone\.final_norm\.", "head_norm."),
    (r"^backbone\.stages\.(\d+)\.(\d+)\.norm(\d)\.", r"stages.\1.\2.prebn\3."),
    (r"^backbone\.stages\.", "stages."),
    (r"\.repmlp_block\.gp\.conv(\d)\.conv\.", r".repmlp_block.gp.fc\1."),
    (r"^head\.fc\.", "head."),
)


def _rename(key: str, renames: _Renames) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def block_keys_to_ours(state_dict: dict, prefix: str, kernels: list[tuple[int, int]]) -> None:
    """Rename the authors' keys of one RepMLP v1 block under ``prefix`` to ours, in place.

    Args:
        state_dict: the state dict being loaded.
        prefix: the block's key prefix (``'stages.1.1.repmlp.'``).
        kernels: the block's local-perceptron branches as (k, dilation); ``repconv{k}`` is the branch of
            kernel k (the authors have no dilated branches).
    """
    branch_index = {f"repconv{k}.": i for i, (k, d) in enumerate(kernels) if d == 1}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local, new = key[len(prefix) :], None
        for old, ours in _V1_BLOCK:
            if local.startswith(old):
                new = ours + local[len(old) :]
                break
        if local.startswith("repconv"):
            head = local[: local.index(".") + 1]
            if head in branch_index:
                new = f"local_perceptron.branches.{branch_index[head]}." + local[len(head) :]
        if new is None:
            continue
        value = state_dict.pop(key)
        if new == "partition_perceptron.fc3.weight" and value.dim() == 4:
            value = value.flatten(1)  # the authors store FC3 as a grouped 1x1 conv
        state_dict[prefix + new] = value


def resnet_keys_to_ours(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The authors' RepMLP-ResNet keys (``stage0``..``stage4``, ``light_*``/``btnk_*``, ``linear``, block
    internals), train or inference form, renamed to ours; other keys pass through."""
    out = {_rename(k, _V1_RESNET): v for k, v in state_dict.items()}
    for name, module in model.named_modules():
        if hasattr(module, "partition_perceptron"):  # a RepMLP v1 block
            block_keys_to_ours(out, f"{name}." if name else "", module.reparam_conv_k)
    return out


def _reshaped(value: torch.Tensor, *shape: int) -> torch.Tensor:
    """``value`` reshaped, or as it is when its size does not fit (the strict load then names the mismatch)."""
    known = math.prod(s for s in shape if s != -1)
    return value.reshape(shape) if known and value.numel() % known == 0 else value


def authors_repmlpnet_keys_to_ours(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The authors' RepMLPNet keys and shapes (1x1-conv FCs, FC3 as a grouped conv, ``repconv{k}``), train or
    locality-injected form, renamed and reshaped to ours; other keys pass through."""
    branch = {int(k): i for i, k in enumerate(model.init_args["reparam_conv_k"])}
    out = {}
    for key, value in state_dict.items():
        key = _rename(key, _REPMLPNET)
        key = re.sub(
            r"\.repmlp_block\.repconv(\d+)\.",
            lambda m: f".repmlp.local_perceptron.branches.{branch.get(int(m.group(1)), m.group(1))}.",
            key,
        )
        stage = re.match(r"stages\.(\d+)\.", key)
        if ".global_perceptron.fc" in key and value.dim() == 4:
            value = value.flatten(1)
        elif key.endswith("channel_perceptron.fc3.weight"):  # (S*hw, hw, 1, 1), S groups
            value = _reshaped(value, -1, value.shape[1], value.shape[1])
        elif key.endswith("channel_perceptron.fc3.bias") and stage and int(stage[1]) < len(model.partitions):
            value = _reshaped(value, -1, math.prod(model.partitions[int(stage[1])]))
        out[key] = value
    return out


def mmpretrain_repmlpnet_keys_to_ours(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """mmpretrain's RepMLPNet keys (train form, or its deploy form: FC3 with a bias, every other BN kept), renamed
    to the authors' names and from there to ours."""
    return authors_repmlpnet_keys_to_ours({_rename(k, _MMPRETRAIN_REPMLPNET): v for k, v in state_dict.items()}, model)


@dataclass(frozen=True)
class KeyLayout:
    """A checkpoint key layout of one model family: whose it is, a key only its files hold, its rename to ours.

    Attributes:
        name: who writes files in it ("mmpretrain's RepMLPNet").
        marker: the key that identifies its files (after a ``module.`` prefix is stripped).
        to_ours: ``(state_dict, model) -> state_dict`` in our keys and shapes; a pure rename and reshape that never
            raises (a value that does not fit is passed on as it is, for the strict load to name).
    """

    name: str
    marker: str
    to_ours: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


def _as_it_is(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return state_dict


OURS = KeyLayout("ours", "stem.conv.weight", _as_it_is)
AUTHORS_RESNET = KeyLayout("the authors' RepMLP-ResNet (paper v1)", "stage0.0.conv.weight", resnet_keys_to_ours)
AUTHORS_REPMLPNET = KeyLayout("the authors' RepMLPNet", "conv_embedding.conv.weight", authors_repmlpnet_keys_to_ours)
MMPRETRAIN_REPMLPNET = KeyLayout(
    "mmpretrain's RepMLPNet", "backbone.patch_embed.projection.weight", mmpretrain_repmlpnet_keys_to_ours
)
REPMLPNET_LAYOUTS = (OURS, AUTHORS_REPMLPNET, MMPRETRAIN_REPMLPNET)


def detect_layout(state_dict: dict[str, torch.Tensor], layouts: tuple[KeyLayout, ...]) -> KeyLayout | None:
    """The layout whose marker key ``state_dict`` holds, or None."""
    return next((layout for layout in layouts if layout.marker in state_dict), None)


def keys_to_ours(
    state_dict: dict[str, torch.Tensor], model: nn.Module, layouts: tuple[KeyLayout, ...]
) -> dict[str, torch.Tensor]:
    """``state_dict`` renamed to ours from the layout its keys show; as it is when they show none of ``layouts``."""
    layout = detect_layout(state_dict, layouts)
    return state_dict if layout is None else layout.to_ours(state_dict, model)


def repmlpnet_keys_to_ours(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A RepMLPNet state dict in any of :data:`REPMLPNET_LAYOUTS` (ours, the authors', mmpretrain's), in ours."""
    return keys_to_ours(state_dict, model, REPMLPNET_LAYOUTS)


# ------------------------------------------------------------------------------------------ emulations


class AuthorsRepMLP(nn.Module):
    """The authors' deploy-form RepMLP v1 block, run on one of our deploy-form blocks (weights shared).

    As their inference code runs it: the global perceptron added through a 6-D view, partitions by a 6-D
    permute, FC3 as a grouped 1x1 Conv2d over C*h*w channels, a 6-D permute back.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if not block.deploy:
            raise ValueError("AuthorsRepMLP emulates the deploy form: convert the block first")
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        n, c = x.shape[:2]
        parts = x.reshape(n, c, b.hp, b.h, b.wp, b.w)
        if b.global_perceptron is not None:
            gp = b.global_perceptron
            v = gp.fc2(F.relu(gp.fc1(F.avg_pool2d(x, (b.h, b.w)).reshape(n, -1))))
            parts = parts + v.reshape(n, c, b.hp, 1, b.wp, 1)
        parts = parts.permute(0, 2, 4, 1, 3, 5).reshape(-1, c * b.h * b.w, 1, 1)
        fc3 = b.partition_perceptron.fc3
        y = F.conv2d(parts, fc3.weight[..., None, None], fc3.bias, groups=fc3.groups)
        y = y.reshape(n, b.hp, b.wp, b.out_channels, b.h, b.w).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(n, b.out_channels, b.H, b.W)


class AuthorsRepMLPNetBlock(nn.Module):
    """The authors' locality-injected RepMLPNet block, op for op: FC3 as a grouped 1x1 conv over S*h*w channels."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        block = copy.deepcopy(block)
        block.reparameterize()
        s, h, w = block.sharesets, block.h, block.w
        self.sharesets, self.h, self.w, self.global_perceptron = s, h, w, block.global_perceptron
        self.fc3 = nn.Conv2d(s * h * w, s * h * w, 1, groups=s)
        weight, bias = block.channel_perceptron.fc3.weight, block.channel_perceptron.fc3.bias
        self.fc3.weight = nn.Parameter(weight.detach().reshape(-1, h * w, 1, 1).clone())
        self.fc3.bias = nn.Parameter(bias.detach().reshape(-1).clone())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        n, c, H, W = x.shape
        s, h, w = self.sharesets, self.h, self.w
        hp, wp = H // h, W // w
        scale = self.global_perceptron(x)
        p = x.reshape(-1, c, hp, h, wp, w).permute(0, 2, 4, 1, 3, 5)
        y = self.fc3(p.reshape(-1, s * h * w, 1, 1))
        y = y.reshape(-1, hp, wp, s, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, H, W)
        return y * scale if residual is None else residual + y * scale


def _share_tensors_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree that shares every parameter and buffer with ``model``."""
    return copy.deepcopy(model, memo={id(t): t for t in itertools.chain(model.parameters(), model.buffers())})


def _replace_modules(model: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, kind):
                setattr(module, name, make(child))
    return model.eval()


def authors_deploy_form(deploy: nn.Module) -> nn.Module:
    """``deploy`` with every RepMLP v1 block run the authors' way (:class:`AuthorsRepMLP`), sharing its weights."""
    from .convert import is_deploy_form
    from .layers import RepMLP

    if not is_deploy_form(deploy):
        raise ValueError("authors_deploy_form needs a deploy-form model (repmlp.convert_to_deploy)")
    return _replace_modules(_run_nchw(_share_tensors_copy(deploy)), RepMLP, AuthorsRepMLP)


def _run_nchw(model: nn.Module) -> nn.Module:
    """As their code runs: NCHW, so 4-D weights become contiguous copies (the FC weights stay shared) and a zoo
    model is told not to turn its inputs channels_last."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.dim() == 4 and not p.is_contiguous():
                module._parameters[name] = nn.Parameter(p.detach().contiguous(), p.requires_grad)
    if hasattr(model, "channels_last"):
        model.channels_last = False
    return model


def authors_inference_form(train: nn.Module) -> nn.Module:
    """The authors' RepMLPNet inference form of a train-form model: FC3 locality-injected as a grouped 1x1 conv,
    every other BN kept. Computes the same function; exists to measure speed against."""
    from .models.repmlpnet import RepMLPBlock

    return _replace_modules(copy.deepcopy(train), RepMLPBlock, AuthorsRepMLPNetBlock)


def authors_form(train: nn.Module, deploy: nn.Module) -> nn.Module | None:
    """The authors' inference form of a model of ours (emulated), or None when we have no emulation for it."""
    from .layers import RepMLP
    from .models.repmlpnet import RepMLPBlock

    if any(isinstance(m, RepMLP) for m in deploy.modules()):
        return authors_deploy_form(deploy)
    if any(isinstance(m, RepMLPBlock) for m in train.modules()):
        return authors_inference_form(train)
    return None


def _authors_fuse_bn(weight: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Their float32 conv-BN fold."""
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, *([1] * (weight.dim() - 1)))
    return weight * t, bn.bias - bn.running_mean * bn.weight / std


def _authors_switch_conv_bn(module: nn.Module) -> None:
    """Their ``ConvBN.switch_to_deploy``: the fold written into a freshly initialised Conv2d with bias."""
    conv = module.conv
    kernel, bias = _authors_fuse_bn(conv.weight, module.bn)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    )
    fused.weight.data, fused.bias.data = kernel, bias
    module.conv, module.bn = fused, None


def _authors_switch_repmlp(block: nn.Module) -> None:
    """Their ``RepMLPBlock.switch_to_deploy``: each local conv's FC matrix by convolving an identity matrix, summed
    with the BN-folded FC3 into a freshly initialised grouped 1x1 Conv2d; the pooled-input BN folded into fc1."""
    pp, lp, gp = block.partition_perceptron, block.local_perceptron, block.global_perceptron
    if any(d != 1 for _, d in block.reparam_conv_k) or block.in_channels != block.out_channels:
        raise ValueError("the authors' conversion has no dilated branches and needs in_channels == out_channels")
    c, o, h, w, g = block.in_channels, block.out_channels, block.h, block.w, block.fc3_groups
    fc_weight, fc_bias = _authors_fuse_bn(pp.fc3.weight.reshape(o * h * w, -1, 1, 1), pp.bn)
    if lp is not None:
        branches = {k: _authors_fuse_bn(b.conv.weight, b.bn) for (k, _), b in zip(block.reparam_conv_k, lp.branches)}
        largest = max(branches)
        total_kernel, total_bias = branches[largest]
        for k, (kernel, bias) in branches.items():
            if k != largest:
                total_kernel = total_kernel + F.pad(kernel, [(largest - k) // 2] * 4)
                total_bias = total_bias + bias
        eye = torch.eye(c * h * w // g).repeat(1, g).reshape(c * h * w // g, c, h, w)
        fc_k = F.conv2d(eye, total_kernel, padding=largest // 2, groups=g)
        fc_k = fc_k.reshape(o * h * w // g, c * h * w).t()
        fc_weight, fc_bias = fc_k.reshape_as(fc_weight) + fc_weight, total_bias.repeat_interleave(h * w) + fc_bias
    if gp is not None:
        std = (gp.bn.running_var + gp.bn.eps).sqrt()
        scale = gp.bn.weight / std
        avg_bias = gp.bn.bias - gp.bn.running_mean * scale
        times = gp.fc1.in_features // len(avg_bias)
        gp.fc1.bias.data = gp.fc1.bias + gp.fc1.weight.matmul(avg_bias.repeat_interleave(times).view(-1, 1)).squeeze()
        gp.fc1.weight.data = gp.fc1.weight * scale.repeat_interleave(times).view(1, -1)
        gp.bn = None
    fc3 = nn.Conv2d(c * h * w, o * h * w, 1, groups=g, bias=True)
    fc3.weight.data, fc3.bias.data = fc_weight, fc_bias
    # into our deploy-form block (FC3 as (out, in/g), as their 1x1 conv flattened)
    pp.fc3.weight, pp.fc3.bias = nn.Parameter(fc3.weight.flatten(1)), fc3.bias
    pp.bn, block.local_perceptron = None, None


@torch.no_grad()
def authors_convert(train: nn.Module) -> nn.Module:
    """The authors' whole-model conversion (their ``repmlp_model_convert``), emulated op for op in float32 on a
    RepMLP-ResNet of ours: a deep copy, then every RepMLP block and every conv-BN switched to its deploy form as
    their code does it. Returns our deploy form; exists to time :func:`repmlp.convert_to_deploy` against."""
    from .convert import is_deploy_form
    from .layers import ConvBN, RepMLP

    model = _run_nchw(copy.deepcopy(train))  # their modules hold contiguous (NCHW) kernels
    for module in [m for m in model.modules() if isinstance(m, RepMLP)]:
        _authors_switch_repmlp(module)
    for module in [m for m in model.modules() if isinstance(m, ConvBN) and m.bn is not None]:
        _authors_switch_conv_bn(module)
    if not is_deploy_form(model):
        raise ValueError(
            "the authors' conversion is emulated for RepMLP v1 blocks and conv-BNs only; this model has "
            "other training-time modules (RepMLPNet's is their locality injection)"
        )
    return model.eval()
