"""Everything about the authors' code (DingXiaoH/RepMLP): their checkpoint key layouts and emulations of their
inference forms.

Key layouts (train and inference forms) are mapped to ours by pure renames; the authors' RepMLPNet inference
form ("locality injection": FC3 with a bias, every other BN kept) is a partly re-parameterized state that
:func:`repmlp.load_checkpoint` matches structurally, so nothing here converts weights.

The emulations run our weights op for op the way the authors' inference code runs them (6-D partition
permutes, FC3 as a grouped 1x1 conv over C*h*w channels). They compute the same function as our deploy forms
and exist to be raced against in :mod:`repmlp.benchmark`; their code itself is not used.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Callable

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


def repmlpnet_keys_to_ours(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The authors' RepMLPNet keys and shapes (1x1-conv FCs, FC3 as a grouped conv, ``repconv{k}``), train or
    locality-injected form, renamed and reshaped to ours; other keys pass through."""
    if "stem.conv.weight" in state_dict:  # ours
        return state_dict
    branch = {int(k): i for i, k in enumerate(model.init_args["reparam_conv_k"])}
    out = {}
    for key, value in state_dict.items():
        key = _rename(key, _REPMLPNET)
        key = re.sub(
            r"\.repmlp_block\.repconv(\d+)\.",
            lambda m: f".repmlp.local_perceptron.branches.{branch.get(int(m.group(1)), m.group(1))}.",
            key,
        )
        if ".global_perceptron.fc" in key and value.dim() == 4:
            value = value.flatten(1)
        elif key.endswith("channel_perceptron.fc3.weight"):  # (S*hw, hw, 1, 1), S groups
            value = value.reshape(-1, value.shape[1], value.shape[1])
        elif key.endswith("channel_perceptron.fc3.bias"):
            stage = int(key.split(".")[1])
            value = value.reshape(-1, math.prod(model.partitions[stage]))
        out[key] = value
    return out


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
    return _replace_modules(_share_tensors_copy(deploy), RepMLP, AuthorsRepMLP)


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
