"""RepMLP-ResNet-50 (RepMLP paper v1, Sec. 4.2, Tables 2-4 and 7).

ResNet-50 whose stride-1 bottlenecks in c3 and c4 (3 and 5 blocks) are RepMLP Light or Bottleneck
blocks; the first block of every stage stays a ResNet bottleneck.

Sizes. Every stride-2 layer pads, so a stage's map is ``ceil`` of the previous one's half, and a c3/c4 map that is
no multiple of the partition is zero-padded to the next one inside each RepMLP block. A model accepts every input
whose c3 and c4 maps cut into its partition grids (the global perceptrons' fc1/fc2 are sized for them);
``set_input_size`` moves it to another grid. ``output_stride`` 16 or 8 runs c5 (and for 8 also c4) at stride 1, as
the paper ran Cityscapes (v1 Sec. 4.4, following PSPNet-50): c4 is not dilated, c5's 3x3 convs are dilated by
32 / output_stride.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import drop_blocks
from torch import nn

from ..authors import RESNET_LAYOUTS, keys_to_ours
from ..layers import ConvBN, RepMLP, cells, in_layout, shape_str
from ._base import NCHWStage, RepMLPModel, build, check_rate, drop_path, drop_path_rates, factory_kwargs, pretrained_cfg

torch.fx.wrap("in_layout")  # FX leaves are per module (see repmlp.layers.in_layout)

__all__ = ["RepMLPResNet"]


class Stem(ConvBN):
    """7x7/2 conv-BN-ReLU and 3x3/2 max-pool."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_chs, out_chs, 7, stride=2, act=True, deploy=deploy, device=device, dtype=dtype)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.channels_last = False  # set by the model (RepMLPModel.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # here, not only in the model: timm's feature wrappers call the stem themselves
            x = in_layout(x, True)
        return self.pool(self.conv_bn_act(x))


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
        dilation: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        mid = out_chs // 4
        self.shortcut = (
            ConvBN(in_chs, out_chs, 1, stride, deploy=deploy, **dd)
            if stride != 1 or in_chs != out_chs
            else nn.Identity()
        )
        self.conv1 = ConvBN(in_chs, mid, 1, act=True, deploy=deploy, **dd)
        self.conv2 = ConvBN(mid, mid, 3, stride, dilation=dilation, act=True, deploy=deploy, **dd)
        self.drop_block = drop_block or nn.Identity()
        self.conv3 = ConvBN(mid, out_chs, 1, deploy=deploy, **dd)
        self.drop_path = drop_path(drop_path_rate)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_path(self.conv3(self.drop_block(self.conv2(self.conv1(x)))))
        y += self.shortcut(x)  # in place, as timm's ResNet: no fresh buffer to fault in (a cost at batch 1)
        return self.act(y)


class RepMLPLightBlock(nn.Module):
    """Light block (paper Fig. 3): 1x1 conv (C -> C/8), RepMLP, ReLU, 1x1 conv (C/8 -> C), identity."""

    def __init__(
        self,
        chs: int,
        size: tuple[int, int],
        repmlp_kwargs: dict,
        deploy: bool = False,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        mid = chs // 8
        self.conv1 = ConvBN(chs, mid, 1, act=True, deploy=deploy, **dd)
        self.repmlp = RepMLP(mid, mid, *size, deploy=deploy, **repmlp_kwargs, **dd)
        self.conv3 = ConvBN(mid, chs, 1, deploy=deploy, **dd)
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        mid = chs // 4
        inner = mid // reduction
        self.conv1 = ConvBN(chs, mid, 1, act=True, deploy=deploy, **dd)
        self.conv2 = ConvBN(mid, inner, 3, act=True, deploy=deploy, **dd)
        self.repmlp = RepMLP(inner, inner, *size, deploy=deploy, **repmlp_kwargs, **dd)
        self.conv4 = ConvBN(inner, mid, 3, act=True, deploy=deploy, **dd)
        self.conv5 = ConvBN(mid, chs, 1, deploy=deploy, **dd)
        self.drop_path = drop_path(drop_path_rate)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_path(self.conv5(self.conv4(self.act(self.repmlp(self.conv2(self.conv1(x)))))))
        y += x
        return self.act(y)


def stage_strides(output_stride: int = 32) -> list[int]:
    """Strides of c2..c5: ResNet's (1, 2, 2, 2), with c5's (16) or c4's and c5's (8) removed."""
    return [1, 2, 2 if output_stride >= 16 else 1, 2 if output_stride >= 32 else 1]


def stage_sizes(H: int, W: int, output_stride: int = 32) -> list[tuple[int, int]]:
    """Map sizes of c2..c5 for an H x W input: the stem conv and max-pool (both stride 2, padded) give
    ceil(H / 4), and each stage of stride 2 halves its input, rounding up."""
    H, W = cells(cells(H, 2), 2), cells(cells(W, 2), 2)
    sizes: list[tuple[int, int]] = []
    for stride in stage_strides(output_stride):
        H, W = cells(H, stride), cells(W, stride)
        sizes.append((H, W))
    return sizes


def _per_stage(value: int | Sequence[int], name: str) -> list[int]:
    """An int for c3 and c4 alike, or one per stage (c3, c4)."""
    values = [value, value] if isinstance(value, int) else list(value)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{name} must be a positive int or one per stage (c3, c4), got {value!r}")
    return values


class RepMLPResNet(RepMLPModel):
    """ResNet-50 with RepMLP blocks in c3 and c4.

    Files load in our layout (and repmlp 0.1's) or the authors' (:data:`repmlp.authors.RESNET_LAYOUTS`).

    Args:
        block_type: 'light' or 'bottleneck'.
        img_size: the input resolution the RepMLP blocks are built for (any size; see the module docstring for
            the sizes a model accepts).
        partition: RepMLP partition size h = w.
        fc3_groups: FC3 groups in c3 and c4.
        reparam_conv_k: local perceptron kernel sizes.
        bottleneck_reduction: r of the Bottleneck block in c3 and c4.
        widths: output channels of c2..c5 (ResNet-50's by default; the stem has a quarter of c2's).
        fc1_fc2_reduction: global perceptron hidden reduction, one for c3 and c4 or one per stage (the paper's
            Cityscapes backbone: (4, 8)).
        output_stride: 32, 16 (c5 at stride 1, dilated 2) or 8 (c4 and c5 at stride 1, c5 dilated 4).
        num_classes: classifier outputs (0 for none).
        in_chans: input channels.
        global_pool: timm pooling type.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth: the largest rate of dropping a block's residual branch (rising
            linearly over the blocks); identity in eval, so conversion is unaffected.
        drop_block_rate: DropBlock in the ResNet bottlenecks of c4 and c5, as in timm's ResNet (RepMLP blocks
            have none); identity in eval.
        deploy: build the deploy form directly (no BatchNorm, three-FC RepMLP blocks).
        device: where every tensor is created (timm's factory kwarg; ``'meta'`` included).
        dtype: the floating dtype of every parameter and buffer (timm's factory kwarg).
    """

    key_layouts = RESNET_LAYOUTS

    def __init__(
        self,
        block_type: str = "light",
        img_size: int | tuple[int, int] = 224,
        partition: int = 7,
        fc3_groups: Sequence[int] = (8, 8),
        reparam_conv_k: Sequence[int] = (1, 3, 5),
        bottleneck_reduction: Sequence[int] = (2, 4),
        widths: Sequence[int] = (256, 512, 1024, 2048),
        fc1_fc2_reduction: int | Sequence[int] = 1,
        output_stride: int = 32,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_block_rate: float = 0.0,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            block_type=block_type,
            img_size=img_size,
            partition=partition,
            fc3_groups=fc3_groups,
            reparam_conv_k=reparam_conv_k,
            bottleneck_reduction=bottleneck_reduction,
            widths=widths,
            fc1_fc2_reduction=fc1_fc2_reduction,
            output_stride=output_stride,
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            drop_block_rate=drop_block_rate,
            deploy=deploy,
        )
        dd = factory_kwargs("RepMLPResNet", device, dtype)
        check_rate("drop_block_rate", drop_block_rate)  # drop_path_rate: by drop_path_rates
        if block_type not in ("light", "bottleneck"):
            raise ValueError(f"block_type must be 'light' or 'bottleneck', got {block_type!r}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        img_size = tuple(to_2tuple(img_size))
        reductions = _per_stage(fc1_fc2_reduction, "fc1_fc2_reduction")
        self.img_size, self.partition, self.output_stride = img_size, partition, output_stride
        self.drop_rate = drop_rate
        self.stem = Stem(in_chans, widths[0] // 4, deploy, **dd)

        depths, strides, sizes = (3, 4, 6, 3), stage_strides(output_stride), stage_sizes(*img_size, output_stride)
        stages, in_chs, reduction = [], widths[0] // 4, 4
        self.feature_info = []
        stage_drop_blocks = drop_blocks(drop_block_rate)  # timm ResNet's: DropBlock in c4 and c5
        rates = drop_path_rates(drop_path_rate, depths)
        for i, (width, stride, size, stage_rates) in enumerate(zip(widths, strides, sizes, rates)):
            dilation = 32 // output_stride if i == 3 else 1  # c5 only: the paper leaves c4 undilated
            blocks = []
            for j, rate in enumerate(stage_rates):
                if j > 0 and i in (1, 2):  # c3 and c4
                    kw = dict(
                        h=partition,
                        w=partition,
                        reparam_conv_k=reparam_conv_k,
                        fc1_fc2_reduction=reductions[i - 1],
                        fc3_groups=fc3_groups[i - 1],
                    )
                    blocks.append(
                        RepMLPLightBlock(width, size, kw, deploy, rate, **dd)
                        if block_type == "light"
                        else RepMLPBottleneckBlock(width, size, bottleneck_reduction[i - 1], kw, deploy, rate, **dd)
                    )
                else:
                    drop_block = stage_drop_blocks[i]() if stage_drop_blocks[i] else None
                    chs_in, block_stride = (width, 1) if j else (in_chs, stride)
                    blocks.append(Bottleneck(chs_in, width, block_stride, deploy, rate, drop_block, dilation, **dd))
            # c5 runs NCHW: on its small, wide maps oneDNN's 3x3 convs run faster in NCHW, while c2-c4 and the
            # max-pool run faster in NHWC
            stages.append(NCHWStage(*blocks) if i == 3 else nn.Sequential(*blocks))
            reduction *= stride
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{i}"))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self._init_feature_levels()

    def _repmlp_blocks(self) -> list[tuple[int, RepMLP]]:
        """(stage index, block) of every RepMLP block left in the model (a pruned model has fewer stages)."""
        return [(i, m) for i, stage in enumerate(self.stages) for m in stage.modules() if isinstance(m, RepMLP)]

    def _resize(self, size: tuple[int, int], fc1_fc2_reduction: int | Sequence[int] | None = None) -> dict:
        given = self.init_args["fc1_fc2_reduction"] if fc1_fc2_reduction is None else fc1_fc2_reduction
        reductions = _per_stage(given, "fc1_fc2_reduction")
        sizes = stage_sizes(*size, self.output_stride)
        blocks = self._repmlp_blocks()
        for i, block in blocks:  # every block checked before any changes
            block._check_size(*sizes[i], reductions[i - 1])
        for i, block in blocks:
            block.set_input_size(*sizes[i], reductions[i - 1])
        return dict(fc1_fc2_reduction=given)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        return _check_input(x, self.img_size, self.partition, self.output_stride)


@torch.fx.wrap  # FX leaf: a Python check on the traced shape, kept at run time
def _check_input(x: torch.Tensor, size: tuple[int, int], partition: int, output_stride: int) -> torch.Tensor:
    """``x``, if it is an (N, C, H, W) batch whose c3 and c4 maps cut into the partition grids of ``size``; else a
    ValueError naming both sizes."""
    ok = x.dim() == 4
    if ok:
        built, given = stage_sizes(size[0], size[1], output_stride), stage_sizes(x.shape[2], x.shape[3], output_stride)
        for i in (1, 2):
            for d in (0, 1):
                ok = ok and cells(built[i][d], partition) == cells(given[i][d], partition)
    if not ok:
        raise ValueError(
            f"RepMLPResNet is built for {size[0]}x{size[1]} inputs (its RepMLP blocks for the partition grids of "
            f"c3 and c4 at that size; set_input_size changes it), got input of shape {shape_str(x.shape)}"
        )
    return x


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Deprecated alias (until 0.3; CHANGELOG.md): the renames of :attr:`RepMLPResNet.key_layouts`."""
    return keys_to_ours(state_dict, model, RESNET_LAYOUTS)


def _create(variant: str, pretrained: bool = False, **kwargs) -> RepMLPResNet:
    return build(
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
