"""The pure-MLP model of the RepMLP paper (v1, Table 1) for small images (:class:`PureMLPNet`): the paper's CIFAR
model, its Wide ConvNet baseline, and the 28x28 one-channel model shipped for Fashion-MNIST.

Layout (paper Sec. 4.1): stem FC(in -> C1); three stages, each ``RepMLP, FC(C, C), RepMLP,
FC(C -> next C)`` with max-pooling between stages; head avgpool -> FC(C3 -> 512) -> FC(512 -> classes).
BN follows every conv/FC (the RepMLP ends with its own FC3 BN); ReLU follows every RepMLP and conv-BN.
FCs are 1x1 :class:`~repmlp.layers.ConvBN` so their BNs fuse in the deploy form. The Wide ConvNet swaps
each RepMLP for a 3x3 conv-BN-ReLU.

Sizes. The stem pads to a multiple of its stride, max-pooling rounds up, and a map that is no multiple of the
partition is zero-padded inside each RepMLP block, so any size builds. A model accepts every input whose stage maps
cut into its partition grids (the global perceptrons are sized for them); ``set_input_size`` moves it to another
grid. The Wide ConvNet accepts any size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import SelectAdaptivePool2d, to_2tuple
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..authors import CIFAR_LAYOUTS, keys_to_ours
from ..data import FASHION_MNIST_LABELS, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from ..layers import ConvBN, PatchEmbedding, RepMLP, cells, shape_str
from ..shipped import shipped_folder
from ._base import RepMLPModel, build, check_rate, factory_kwargs, pretrained_cfg

__all__ = ["PureMLPNet", "MLPCifarNet"]


class RepMLPUnit(nn.Sequential):
    """RepMLP followed by ReLU: the token mixer of the pure-MLP model."""

    def __init__(
        self,
        channels: int,
        size: tuple[int, int],
        partition: int,
        fc3_groups: int,
        reparam_conv_k: Sequence[int],
        fc1_fc2_reduction: int,
        deploy: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            RepMLP(
                channels,
                channels,
                *size,
                partition,
                partition,
                reparam_conv_k=reparam_conv_k,
                fc1_fc2_reduction=fc1_fc2_reduction,
                fc3_groups=fc3_groups,
                deploy=deploy,
                device=device,
                dtype=dtype,
            ),
            nn.ReLU(inplace=True),
        )


class MLPStage(nn.Sequential):
    """One stage: (max-pool,) mixer, FC(C, C)-BN-ReLU, mixer, FC(C -> out)-BN-ReLU."""

    def __init__(
        self,
        channels: int,
        out_chs: int,
        size: tuple[int, int],
        downsample: bool,
        mixer: str,
        partition: int,
        fc3_groups: int,
        reparam_conv_k: Sequence[int],
        fc1_fc2_reduction: int,
        deploy: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)

        def token_mixer() -> nn.Module:
            if mixer == "conv":
                return ConvBN(channels, channels, 3, act=True, deploy=deploy, **dd)
            return RepMLPUnit(channels, size, partition, fc3_groups, reparam_conv_k, fc1_fc2_reduction, deploy, **dd)

        super().__init__(
            nn.MaxPool2d(2, ceil_mode=True) if downsample else nn.Identity(),  # rounds up: no row dropped
            token_mixer(),
            ConvBN(channels, channels, 1, act=True, deploy=deploy, **dd),
            token_mixer(),
            ConvBN(channels, out_chs, 1, act=True, deploy=deploy, **dd),
        )


class MlpHead(nn.Module):
    """Pool, FC(C -> hidden)-BN-ReLU (as a 1x1 conv-BN), dropout, classifier.

    Without pooling (``pool_type=''``) every layer applies per position and the head returns maps, (N, hidden,
    H, W) and (N, classes, H, W), as timm's heads with layers after the pooling do (``NormMlpClassifierHead``).
    """

    def __init__(
        self,
        in_chs: int,
        hidden: int,
        num_classes: int,
        pool_type: str,
        drop_rate: float,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self._set_pool(pool_type)
        self.pre_logits = ConvBN(in_chs, hidden, 1, act=True, deploy=deploy, **dd)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def _set_pool(self, pool_type: str) -> None:
        pool = SelectAdaptivePool2d(pool_type=pool_type)
        if pool.feat_mult() != 1:
            raise ValueError(
                f"MlpHead: global_pool={pool_type!r} changes the pooled width, which the FC after it "
                f"is sized for; use 'avg', 'max', 'avgmax' or '' (no pooling)"
            )
        self.global_pool, self.per_position = pool, not pool_type
        self.flatten = nn.Identity() if self.per_position else nn.Flatten(1)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        if pool_type is not None:
            self._set_pool(pool_type)
        self.fc = nn.Linear(self.pre_logits.conv.out_channels, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.flatten(self.pre_logits(self.global_pool(x))))
        if pre_logits:
            return x
        if self.per_position:  # the classifier on each position's features
            return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x)


class PureMLPNet(RepMLPModel):
    """Pure-MLP network of RepMLP blocks for small images (paper v1, Sec. 4.1: CIFAR; our Fashion-MNIST model), or
    its Wide ConvNet baseline. ``MLPCifarNet`` is its former name.

    Args:
        num_classes: classifier outputs; 0 for no classifier.
        in_chans: input channels.
        img_size: input size (H, W), or one int for both; each stage after the first halves it (rounding up).
        widths: channels C of the stages (the paper: three).
        stem_stride: the stem FC reads non-overlapping ``stem_stride`` x ``stem_stride`` patches (1: pixels).
        mixer: ``'repmlp'`` (pure MLP) or ``'conv'`` (Wide ConvNet: 3x3 conv-BN-ReLU).
        partition: RepMLP partition size h = w; must divide every stage resolution.
        fc3_groups: RepMLP FC3 groups g.
        reparam_conv_k: local perceptron kernel sizes.
        fc1_fc2_reduction: global perceptron hidden reduction.
        head_hidden_size: width of the FC between pooling and the classifier.
        drop_rate: dropout before the classifier.
        global_pool: timm pooling type of the head.
        drop_path_rate: refused unless 0: the paper's layout has no residual branches for stochastic depth.
        drop_block_rate: refused unless 0: no DropBlock placement in this family (the paper's recipe has none).
        deploy: build the deploy form directly.
        device: where every tensor is created (timm's factory kwarg; ``'meta'`` included).
        dtype: the floating dtype of every parameter and buffer (timm's factory kwarg).
    """

    key_layouts = CIFAR_LAYOUTS  # ours (repmlp 0.1 kept the head's layers at the root)

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 32,
        widths: Sequence[int] = (16, 32, 64),
        stem_stride: int = 1,
        mixer: str = "repmlp",
        partition: int = 8,
        fc3_groups: int = 2,
        reparam_conv_k: Sequence[int] = (1, 3, 5),
        fc1_fc2_reduction: int = 1,
        head_hidden_size: int = 512,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        drop_path_rate: float = 0.0,
        drop_block_rate: float = 0.0,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=img_size,
            widths=widths,
            stem_stride=stem_stride,
            mixer=mixer,
            partition=partition,
            fc3_groups=fc3_groups,
            reparam_conv_k=reparam_conv_k,
            fc1_fc2_reduction=fc1_fc2_reduction,
            head_hidden_size=head_hidden_size,
            drop_rate=drop_rate,
            global_pool=global_pool,
            drop_path_rate=drop_path_rate,
            drop_block_rate=drop_block_rate,
            deploy=deploy,
        )
        dd = factory_kwargs("PureMLPNet", device, dtype)
        check_rate("drop_path_rate", drop_path_rate, "PureMLPNet", "no residual branches for stochastic depth to drop")
        check_rate("drop_block_rate", drop_block_rate, "PureMLPNet", "no DropBlock placement in this family")
        if mixer not in ("repmlp", "conv"):
            raise ValueError(f"PureMLPNet: mixer must be 'repmlp' or 'conv', got {mixer!r}")
        img_size = tuple(to_2tuple(img_size))
        self.in_chans, self.img_size, self.drop_rate = in_chans, img_size, drop_rate
        self.stem_stride = stem_stride
        self.grid_partition = partition if mixer == "repmlp" else 0  # what cuts the stage maps (0: nothing)
        sizes = stage_sizes(*img_size, stem_stride, len(widths))

        self.stem = PatchEmbedding(in_chans, widths[0], stem_stride, deploy, **dd)
        outs = list(widths[1:]) + [widths[-1]]
        mixing = (mixer, partition, fc3_groups, reparam_conv_k, fc1_fc2_reduction, deploy)
        self.stages = nn.Sequential(
            *[MLPStage(c, out, size, i > 0, *mixing, **dd) for i, (c, out, size) in enumerate(zip(widths, outs, sizes))]
        )
        self.feature_info = [
            dict(num_chs=out, reduction=stem_stride * 2**i, module=f"stages.{i}") for i, out in enumerate(outs)
        ]
        if self.stem_is_level(len(widths)):
            self.feature_info.insert(0, dict(num_chs=widths[0], reduction=stem_stride, module="stem"))
        self.num_features = outs[-1]
        self.head_hidden_size = head_hidden_size
        self.head = MlpHead(self.num_features, head_hidden_size, num_classes, global_pool, drop_rate, deploy, **dd)
        self._init_feature_levels()

    @staticmethod
    def stem_is_level(num_stages: int) -> bool:
        """The stem's output is feature level 0 when there are fewer than three stages (timm's feature wrappers
        expect at least three levels)."""
        return num_stages < 3

    def _resize(self, size: tuple[int, int], fc1_fc2_reduction: int | None = None) -> dict:
        reduction = self.init_args["fc1_fc2_reduction"] if fc1_fc2_reduction is None else fc1_fc2_reduction
        sizes = stage_sizes(*size, self.stem_stride, len(self.init_args["widths"]))
        blocks = [(i, m) for i, stage in enumerate(self.stages) for m in stage.modules() if isinstance(m, RepMLP)]
        for i, block in blocks:  # every block checked before any changes
            block._check_size(*sizes[i], reduction)
        for i, block in blocks:
            block.set_input_size(*sizes[i], reduction)
        return dict(fc1_fc2_reduction=reduction)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        return _check_input(x, self.in_chans, self.img_size, self.stem_stride, len(self.stages), self.grid_partition)


MLPCifarNet = PureMLPNet  # the former name (see CHANGELOG.md)


def stage_sizes(H: int, W: int, stem_stride: int, num_stages: int) -> list[tuple[int, int]]:
    """Map sizes of the stages for an H x W input: the stem's patches, then halved (rounding up) per stage."""
    H, W = cells(H, stem_stride), cells(W, stem_stride)
    sizes = [(H, W)]
    for _ in range(1, num_stages):
        H, W = cells(H, 2), cells(W, 2)
        sizes.append((H, W))
    return sizes


@torch.fx.wrap  # FX leaf: a Python check on the traced shape, kept at run time
def _check_input(
    x: torch.Tensor, chans: int, size: tuple[int, int], stem_stride: int, num_stages: int, partition: int
) -> torch.Tensor:
    """``x``, if it is (N, chans, H, W) whose stage maps cut into the partition grids of ``size`` (any size for
    ``partition`` 0, no RepMLP); else a ValueError naming both shapes."""
    ok = x.dim() == 4 and x.shape[1] == chans
    if ok and partition > 0:
        built = stage_sizes(size[0], size[1], stem_stride, num_stages)
        given = stage_sizes(x.shape[2], x.shape[3], stem_stride, num_stages)
        for b, g in zip(built, given):
            for d in (0, 1):
                ok = ok and cells(b[d], partition) == cells(g[d], partition)
    if not ok:
        raise ValueError(
            f"PureMLPNet is built for (N, {chans}, {size[0]}, {size[1]}) inputs (its RepMLP blocks for the "
            f"partition grids at that size; set_input_size changes it), got {shape_str(x.shape)}"
        )
    return x


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Deprecated alias (until 0.3; CHANGELOG.md): the renames of :attr:`MLPCifarNet.key_layouts`."""
    return keys_to_ours(state_dict, model, CIFAR_LAYOUTS)


def _create(variant: str, pretrained: bool = False, **kwargs) -> PureMLPNet:
    stages = len(kwargs["widths"])
    levels = tuple(range(stages + PureMLPNet.stem_is_level(stages)))
    features = dict(flatten_sequential=True, out_indices=levels)
    return build(PureMLPNet, variant, pretrained, feature_cfg=features, **kwargs)


def _cfg(**kwargs) -> dict:
    return pretrained_cfg(
        dict(
            num_classes=10,
            input_size=(3, 32, 32),
            pool_size=(8, 8),
            crop_pct=1.0,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            paper_ids="arXiv:2105.01883",
            paper_name="RepMLP: Re-parameterizing Convolutions into Fully-connected Layers for Image Recognition",
        ),
        **kwargs,
    )


_FMNIST = dict(
    input_size=(1, 28, 28),
    pool_size=(7, 7),
    mean=FASHION_MNIST_MEAN,
    std=FASHION_MNIST_STD,
    label_names=FASHION_MNIST_LABELS,
)

default_cfgs = generate_default_cfgs(
    {
        "repmlp_cifar_mlp": _cfg(description="Pure-MLP CIFAR model of the RepMLP paper (v1, Table 1); no weights."),
        "repmlp_cifar_wideconv": _cfg(
            fixed_input_size=False,  # no RepMLP: any size runs
            description="Wide ConvNet baseline of the pure-MLP model (RepMLP paper v1, Table 1); no weights.",
        ),
        "repmlp_fmnist_mlp.fmnist": _cfg(
            file=shipped_folder("repmlp_fmnist_mlp", "fmnist"),
            **_FMNIST,
            description="Pure-MLP RepMLP model trained by this package on Fashion-MNIST (28x28 grey images as they "
            "are); weights shipped with the package (train form; the deploy form is converted on load).",
            notes=(
                "Not a model of the paper: the paper's pure-MLP layout (RepMLP, FC, RepMLP, FC per stage) sized for a "
                "2-core CPU: a 2x2-patch stem FC, two stages (C = 24, 48) at 14x14 and 7x7, h = w = 7, g = 4, "
                "local perceptron k = 1, 3.",
                "Recipe: configs/fmnist_repmlp.yaml (12 epochs SGD); model card: README.md of the weights folder.",
            ),
        ),
    }
)


@register_model
def repmlp_cifar_mlp(pretrained: bool = False, **kwargs) -> PureMLPNet:
    """Pure-MLP CIFAR model (paper v1, Table 1): C = 16/32/64 at 32/16/8, RepMLP h = w = 8, g = 2."""
    args = dict(in_chans=3, img_size=32, widths=(16, 32, 64), partition=8, fc3_groups=2)
    return _create("repmlp_cifar_mlp", pretrained, **dict(args, **kwargs))


@register_model
def repmlp_cifar_wideconv(pretrained: bool = False, **kwargs) -> PureMLPNet:
    """Wide ConvNet baseline of the pure-MLP model (paper v1, Table 1): 3x3 convs, C = 32/64/128."""
    args = dict(in_chans=3, img_size=32, widths=(32, 64, 128), mixer="conv")
    return _create("repmlp_cifar_wideconv", pretrained, **dict(args, **kwargs))


@register_model
def repmlp_fmnist_mlp(pretrained: bool = False, **kwargs) -> PureMLPNet:
    """Pure-MLP model for 28x28 one-channel Fashion-MNIST, sized to train on a 2-core CPU: a 2x2-patch stem FC,
    two stages of the paper's layout at 14x14 and 7x7 with C = 24/48, RepMLP h = w = 7, g = 4, k = 1, 3."""
    args = dict(
        in_chans=1, img_size=28, widths=(24, 48), stem_stride=2, partition=7, fc3_groups=4, reparam_conv_k=(1, 3)
    )
    return _create("repmlp_fmnist_mlp", pretrained, **dict(args, **kwargs))
