"""RepMLP-ResNet-50 (RepMLP paper v1, Sec. 4.2, Tables 2-4 and 7).

ResNet-50 whose stride-1 bottlenecks in c3 and c4 (3 and 5 blocks) are RepMLP Light or Bottleneck
blocks; the first block of every stage stays a ResNet bottleneck.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import drop_blocks
from torch import nn

from ..authors import AUTHORS_RESNET, OURS, KeyLayout, keys_to_ours
from ..layers import ConvBN, RepMLP, shape_str
from ._base import NCHWStage, RepMLPModel, check_rate, drop_path, drop_path_rates, pretrained_cfg, route_pretrained_file

__all__ = ["RepMLPResNet"]


class Stem(ConvBN):
    """7x7/2 conv-BN-ReLU and 3x3/2 max-pool."""

    def __init__(self, in_chs: int, out_chs: int, deploy: bool = False) -> None:
        super().__init__(in_chs, out_chs, 7, stride=2, act=True, deploy=deploy)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.pool(self.act(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck (stride on the 3x3 conv); the deploy form fuses every conv-BN.

    ``drop_block`` follows the 3x3 conv-BN-ReLU, where timm's ResNet puts it (after the BN, before the ReLU there:
    the same, as the ReLU commutes with a 0/1 mask and a positive scale); ``drop_path`` drops the residual branch.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        deploy: bool = False,
        drop_path_rate: float = 0.0,
        drop_block: nn.Module | None = None,
    ) -> None:
        super().__init__()
        mid = out_chs // 4
        self.shortcut = (
            ConvBN(in_chs, out_chs, 1, stride, deploy=deploy) if stride != 1 or in_chs != out_chs else nn.Identity()
        )
        self.conv1 = ConvBN(in_chs, mid, 1, act=True, deploy=deploy)
        self.conv2 = ConvBN(mid, mid, 3, stride, act=True, deploy=deploy)
        self.drop_block = drop_block or nn.Identity()
        self.conv3 = ConvBN(mid, out_chs, 1, deploy=deploy)
        self.drop_path = drop_path(drop_path_rate)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_path(self.conv3(self.drop_block(self.conv2(self.conv1(x)))))
        y += self.shortcut(x)  # in place, as timm's ResNet: no fresh buffer to fault in (a cost at batch 1)
        return self.act(y)


class RepMLPLightBlock(nn.Module):
    """Light block (paper Fig. 3): 1x1 conv (C -> C/8), RepMLP, ReLU, 1x1 conv (C/8 -> C), identity."""

    def __init__(
        self, chs: int, size: tuple[int, int], repmlp_kwargs: dict, deploy: bool = False, drop_path_rate: float = 0.0
    ) -> None:
        super().__init__()
        mid = chs // 8
        self.conv1 = ConvBN(chs, mid, 1, act=True, deploy=deploy)
        self.repmlp = RepMLP(mid, mid, *size, deploy=deploy, **repmlp_kwargs)
        self.conv3 = ConvBN(mid, chs, 1, deploy=deploy)
        self.drop_path = drop_path(drop_path_rate)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_path(self.conv3(self.act(self.repmlp(self.conv1(x)))))
        y += x
        return self.act(y)


class RepMLPBottleneckBlock(nn.Module):
    """Bottleneck block (paper Fig. 3): 1x1 (C -> C/4), 3x3 (-> C/4r), RepMLP, ReLU, 3x3 (-> C/4),
    1x1 (-> C), identity."""

    def __init__(
        self,
        chs: int,
        size: tuple[int, int],
        reduction: int,
        repmlp_kwargs: dict,
        deploy: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        mid = chs // 4
        inner = mid // reduction
        self.conv1 = ConvBN(chs, mid, 1, act=True, deploy=deploy)
        self.conv2 = ConvBN(mid, inner, 3, act=True, deploy=deploy)
        self.repmlp = RepMLP(inner, inner, *size, deploy=deploy, **repmlp_kwargs)
        self.conv4 = ConvBN(inner, mid, 3, act=True, deploy=deploy)
        self.conv5 = ConvBN(mid, chs, 1, deploy=deploy)
        self.drop_path = drop_path(drop_path_rate)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_path(self.conv5(self.conv4(self.act(self.repmlp(self.conv2(self.conv1(x)))))))
        y += x
        return self.act(y)


class RepMLPResNet(RepMLPModel):
    """ResNet-50 with RepMLP blocks in c3 and c4.

    Args:
        block_type: 'light' or 'bottleneck'.
        img_size: the fixed input resolution (RepMLP blocks are built for one size).
        partition: RepMLP partition size h = w.
        fc3_groups: FC3 groups in c3 and c4.
        reparam_conv_k: local perceptron kernel sizes.
        bottleneck_reduction: r of the Bottleneck block in c3 and c4.
        widths: output channels of c2..c5 (ResNet-50's by default; the stem has a quarter of c2's).
        fc1_fc2_reduction: global perceptron reduction.
        num_classes: classifier outputs (0 for none).
        in_chans: input channels.
        global_pool: timm pooling type.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth: the largest rate of dropping a block's residual branch (rising
            linearly over the blocks); identity in eval, so conversion is unaffected.
        drop_block_rate: DropBlock in the ResNet bottlenecks of c4 and c5, as in timm's ResNet (RepMLP blocks
            have none); identity in eval.
        deploy: build the deploy form directly (no BatchNorm, three-FC RepMLP blocks).
    """

    def __init__(
        self,
        block_type: str = "light",
        img_size: int | tuple[int, int] = 224,
        partition: int = 7,
        fc3_groups: Sequence[int] = (8, 8),
        reparam_conv_k: Sequence[int] = (1, 3, 5),
        bottleneck_reduction: Sequence[int] = (2, 4),
        widths: Sequence[int] = (256, 512, 1024, 2048),
        fc1_fc2_reduction: int = 1,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_block_rate: float = 0.0,
        deploy: bool = False,
    ) -> None:
        super().__init__(locals())
        check_rate("drop_block_rate", drop_block_rate)  # drop_path_rate: by drop_path_rates
        if block_type not in ("light", "bottleneck"):
            raise ValueError(f"block_type must be 'light' or 'bottleneck', got {block_type!r}")
        img_size = to_2tuple(img_size)
        if any(s % 32 or (s // 16) % partition for s in img_size):
            raise ValueError(
                f"img_size={img_size} must be multiples of 32 whose c4 resolution (img_size / 16) is "
                f"divisible by partition={partition}, e.g. {32 * partition} or {64 * partition}"
            )
        self.img_size, self.drop_rate = img_size, drop_rate
        self.stem = Stem(in_chans, widths[0] // 4, deploy)

        depths, strides = (3, 4, 6, 3), (1, 2, 2, 2)
        stages, in_chs, (H, W) = [], widths[0] // 4, (img_size[0] // 4, img_size[1] // 4)
        self.feature_info = []
        stage_drop_blocks = drop_blocks(drop_block_rate)  # timm ResNet's: DropBlock in c4 and c5
        rates = drop_path_rates(drop_path_rate, depths)
        for i, (width, stride, stage_rates) in enumerate(zip(widths, strides, rates)):
            H, W = H // stride, W // stride
            blocks = []
            for j, rate in enumerate(stage_rates):
                if j > 0 and i in (1, 2):  # c3 and c4
                    kw = dict(
                        h=partition,
                        w=partition,
                        reparam_conv_k=reparam_conv_k,
                        fc1_fc2_reduction=fc1_fc2_reduction,
                        fc3_groups=fc3_groups[i - 1],
                    )
                    blocks.append(
                        RepMLPLightBlock(width, (H, W), kw, deploy, rate)
                        if block_type == "light"
                        else RepMLPBottleneckBlock(width, (H, W), bottleneck_reduction[i - 1], kw, deploy, rate)
                    )
                else:
                    drop_block = stage_drop_blocks[i]() if stage_drop_blocks[i] else None
                    chs_in, block_stride = (width, 1) if j else (in_chs, stride)
                    blocks.append(Bottleneck(chs_in, width, block_stride, deploy, rate, drop_block))
            # c5 (7x7 maps at 224, 512-2048 channels) runs NCHW: its 3x3 convs measured 1.5x (batch 1) and 1.25x
            # (batch 8) faster than in NHWC here; c2-c4 and the max-pool are faster in NHWC
            stages.append(NCHWStage(*blocks) if i == 3 else nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=img_size[0] // H, module=f"stages.{i}"))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self._store_run_layout()

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        return _check_input(x, self.img_size)


@torch.fx.wrap  # FX leaf: a Python check on the traced shape, kept at run time
def _check_input(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x``, if it is an (N, C, *size) batch; else a ValueError naming both sizes."""
    if x.dim() != 4 or x.shape[2] != size[0] or x.shape[3] != size[1]:
        raise ValueError(
            f"RepMLPResNet is built for {size[0]}x{size[1]} inputs (RepMLP blocks have a fixed size), "
            f"got input of shape {shape_str(x.shape)}"
        )
    return x


def _ours_and_repmlp_01(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return {re.sub(r"^fc\.", "head.fc.", k): v for k, v in state_dict.items()}  # 0.1: a root classifier


#: The layouts a RepMLP-ResNet file may come in: ours (and repmlp 0.1's), the authors' (train and inference form).
KEY_LAYOUTS = (KeyLayout(OURS.name, OURS.marker, _ours_and_repmlp_01), AUTHORS_RESNET)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Key renames only, from the layout of :data:`KEY_LAYOUTS` the keys show."""
    return keys_to_ours(state_dict, model, KEY_LAYOUTS)


RepMLPResNet.checkpoint_filter_fn = staticmethod(checkpoint_filter_fn)  # what load_checkpoint renames with
RepMLPResNet.key_layouts = KEY_LAYOUTS  # what a file that matches none is compared with


def _create(variant: str, pretrained: bool = False, **kwargs) -> RepMLPResNet:
    route_pretrained_file(variant, pretrained, kwargs)
    return build_model_with_cfg(
        RepMLPResNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs
    )


def _cfg(size: int = 224, **kwargs) -> dict:
    return pretrained_cfg(
        dict(
            num_classes=1000,
            input_size=(3, size, size),
            pool_size=(size // 32, size // 32),
            crop_pct=0.875,
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            paper_ids="arXiv:2105.01883",
            paper_name="RepMLP: Re-parameterizing Convolutions into Fully-connected Layers for Image Recognition",
        ),
        **kwargs,
    )


def _describe(block: str, table: str) -> str:
    return (
        f"RepMLP-ResNet-50 with RepMLP {block} blocks in c3 and c4 (RepMLP paper v1, {table}); architecture "
        f"only, no ImageNet weights are shipped (the authors' checkpoints load through pretrained_cfg_overlay)."
    )


default_cfgs = generate_default_cfgs(
    {
        "repmlp_res50_light_224": _cfg(description=_describe("Light", "Table 4")),
        "repmlp_res50_light_g4_224": _cfg(
            description=_describe("Light", "the authors' released code"),
            notes=(
                "Not in the paper: FC3 groups g = 4 in c3 and c4 (Table 4 has g = 8), the preset of the authors' "
                "released code and checkpoint RepMLP-Res50-light-224.",
            ),
        ),
        "repmlp_res50_bottleneck_224": _cfg(description=_describe("Bottleneck", "Table 4")),
        "repmlp_res50_bottleneck_g8g16_320": _cfg(320, description=_describe("Bottleneck", "Table 7, g = 8/16")),
        "repmlp_res50_bottleneck_g8g8_320": _cfg(320, description=_describe("Bottleneck", "Table 7, g = 8/8")),
        "repmlp_res50_bottleneck_g4g8_320": _cfg(320, description=_describe("Bottleneck", "Table 7, g = 4/8")),
    }
)

_K224, _K320 = (1, 3, 5), (1, 3, 5, 7)


@register_model
def repmlp_res50_light_224(pretrained: bool = False, **kwargs) -> RepMLPResNet:
    """RepMLP-Res50 Light, 224, g=8/8 (paper Table 4, 57.87M deploy params)."""
    args = dict(block_type="light", fc3_groups=(8, 8), reparam_conv_k=_K224)
    return _create("repmlp_res50_light_224", pretrained, **{**args, **kwargs})


@register_model
def repmlp_res50_light_g4_224(pretrained: bool = False, **kwargs) -> RepMLPResNet:
    """RepMLP-Res50 Light, 224, g=4/4: the preset of the authors' released code (86.14M deploy params)."""
    args = dict(block_type="light", fc3_groups=(4, 4), reparam_conv_k=_K224)
    return _create("repmlp_res50_light_g4_224", pretrained, **{**args, **kwargs})


@register_model
def repmlp_res50_bottleneck_224(pretrained: bool = False, **kwargs) -> RepMLPResNet:
    """RepMLP-Res50 Bottleneck, 224, g=8/8 (paper Table 4, 40.87M deploy params)."""
    args = dict(block_type="bottleneck", fc3_groups=(8, 8), reparam_conv_k=_K224)
    return _create("repmlp_res50_bottleneck_224", pretrained, **{**args, **kwargs})


def _res50_320(variant: str, groups: tuple[int, int], pretrained: bool, kwargs: dict) -> RepMLPResNet:
    args = dict(block_type="bottleneck", img_size=320, partition=10, fc3_groups=groups, reparam_conv_k=_K320)
    return _create(variant, pretrained, **{**args, **kwargs})


@register_model
def repmlp_res50_bottleneck_g8g16_320(pretrained: bool = False, **kwargs) -> RepMLPResNet:
    """RepMLP-Res50 Bottleneck, 320, g=8/16 (paper Table 7, 59.22M deploy params)."""
    return _res50_320("repmlp_res50_bottleneck_g8g16_320", (8, 16), pretrained, kwargs)


@register_model
def repmlp_res50_bottleneck_g8g8_320(pretrained: bool = False, **kwargs) -> RepMLPResNet:
    """RepMLP-Res50 Bottleneck, 320, g=8/8 (paper Table 7, 72.02M deploy params)."""
    return _res50_320("repmlp_res50_bottleneck_g8g8_320", (8, 8), pretrained, kwargs)


@register_model
def repmlp_res50_bottleneck_g4g8_320(pretrained: bool = False, **kwargs) -> RepMLPResNet:
    """RepMLP-Res50 Bottleneck, 320, g=4/8 (paper Table 7, 87.38M deploy params)."""
    return _res50_320("repmlp_res50_bottleneck_g4g8_320", (4, 8), pretrained, kwargs)
