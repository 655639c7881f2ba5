"""The authors' (DingXiaoH/RepMLP) and mmpretrain's checkpoint key layouts, train and inference forms, renamed to
ours (:class:`KeyLayout`); the partly re-parameterized inference forms are matched structurally by
:func:`repmlp.load_checkpoint`, so nothing here converts weights. A leaf module: blocks and models read it while
they load. Emulations of the authors' inference code are in :mod:`benchmarks.emulation`."""

from __future__ import annotations

__all__ = [
    "AUTHORS_REPMLPNET",
    "AUTHORS_RESNET",
    "MMPRETRAIN_REPMLPNET",
    "OURS",
    "REPMLPNET_LAYOUTS",
    "KeyLayout",
    "authors_repmlpnet_keys_to_ours",
    "block_keys_to_ours",
    "keys_to_ours",
    "mmpretrain_repmlpnet_keys_to_ours",
    "resnet_keys_to_ours",
]

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

_Renames = tuple[tuple[str, str | Callable[[re.Match], str]], ...]

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


def _ours_and_repmlp_01(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Ours; repmlp 0.1 kept the classifier (RepMLP-ResNet) or the head's layers (the CIFAR models) at the root."""
    return {re.sub(r"^(pre_logits|fc)\.", r"head.\1.", k): v for k, v in state_dict.items()}


OURS = KeyLayout("ours", "stem.conv.weight", _ours_and_repmlp_01)
AUTHORS_RESNET = KeyLayout("the authors' RepMLP-ResNet (paper v1)", "stage0.0.conv.weight", resnet_keys_to_ours)
AUTHORS_REPMLPNET = KeyLayout("the authors' RepMLPNet", "conv_embedding.conv.weight", authors_repmlpnet_keys_to_ours)
MMPRETRAIN_REPMLPNET = KeyLayout(
    "mmpretrain's RepMLPNet", "backbone.patch_embed.projection.weight", mmpretrain_repmlpnet_keys_to_ours
)
#: The layouts each family's files come in, in the order they are tried (a family's class declares its own).
REPMLPNET_LAYOUTS = (KeyLayout(OURS.name, OURS.marker, lambda s, m: s), AUTHORS_REPMLPNET, MMPRETRAIN_REPMLPNET)
RESNET_LAYOUTS = (OURS, AUTHORS_RESNET)
CIFAR_LAYOUTS = (OURS,)


def keys_to_ours(
    state_dict: dict[str, torch.Tensor], model: nn.Module, layouts: tuple[KeyLayout, ...]
) -> dict[str, torch.Tensor]:
    """``state_dict`` renamed to ours from the layout its keys show (the first of ``layouts``, ours, when they show
    none: the strict load then names what does not fit)."""
    layout = next((layout for layout in layouts if layout.marker in state_dict), layouts[0])
    return layout.to_ours(state_dict, model)
