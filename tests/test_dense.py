"""Dense prediction: segmentation-models-pytorch's tu- encoders and a torchvision FPN detector on features_only,
at three sizes (one non-square), with a RepMLP-ResNet and a RepMLPNet encoder, converting exactly."""

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from conftest import TOL, rel_err
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import repmlp
from repmlp import convert_to_deploy, randomize_bn_stats

ENCODERS = {
    "repmlp_res50_light_224": dict(partition=4, widths=(32, 64, 128, 256)),  # built at each size
    "repmlpnet_t224": dict(  # built once: any size runs
        img_size=32, partitions=(8, 4, 2, 1), channels=(8, 16, 16, 32), sharesets=(1, 2, 4, 8), depths=(1, 1, 2, 1)
    ),
}
SIZES = [(64, 64), (96, 96), (64, 96)]


def _kwargs(name, size):
    return {"img_size": size, **ENCODERS[name]}


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("size", SIZES)
def test_smp_unet_converts_exactly(name, size):
    torch.manual_seed(0)
    unet = smp.Unet(
        f"tu-{name}",
        encoder_weights=None,
        classes=3,
        encoder_depth=4,
        decoder_channels=(32, 16, 8, 8),
        **_kwargs(name, size),
    )
    unet = randomize_bn_stats(unet).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        y = unet(x)
        assert y.shape == (1, 3, *size) and rel_err(y, convert_to_deploy(unet)(x)) <= TOL[torch.float32]


class FeatureFPN(nn.Module):
    """A torchvision detection backbone: an FPN over a timm features_only model."""

    def __init__(self, body: nn.Module, channels: int = 16) -> None:
        super().__init__()
        self.body, self.out_channels = body, channels
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), channels, extra_blocks=LastLevelMaxPool())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn({str(i): f for i, f in enumerate(self.body(x))})


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_torchvision_fpn_detector_with_frozen_bns_converts_exactly(name):
    for size in SIZES:
        torch.manual_seed(0)
        body = timm.create_model(name, features_only=True, **_kwargs(name, size))
        body = freeze_batch_norm_2d(randomize_bn_stats(body))  # as detection fine-tuning runs it
        detector = FasterRCNN(
            FeatureFPN(body), num_classes=3, min_size=min(size), max_size=max(size), fixed_size=size[::-1]
        )
        detector.eval()
        deploy = convert_to_deploy(detector)
        assert repmlp.is_deploy_form(deploy.backbone.body)
        images = [torch.rand(3, *size)]
        with torch.no_grad():
            batch, _ = detector.transform(images)
            ours, theirs = detector.backbone(batch.tensors), deploy.backbone(batch.tensors)
            assert all(rel_err(ours[k], theirs[k]) <= TOL[torch.float32] for k in ours)
            assert len(deploy(images)) == 1


@pytest.mark.parametrize(
    "name,decoder",
    [("repmlp_res50_light_224", "FPN"), ("repmlp_res50_light_224", "DeepLabV3Plus"), ("repmlpnet_t224", "FPN")],
)
def test_smp_fpn_and_deeplab_decoders_convert_exactly(name, decoder):
    """smp's other decoders at the non-square size. DeepLabV3+ asks its encoder for output_stride 16 (RepMLP-ResNet's
    c5 then runs at stride 1, dilated by 2); RepMLPNet has no output_stride (timm's TypeError for the argument)."""
    size = SIZES[-1]
    torch.manual_seed(0)
    kwargs = dict(encoder_depth=5) if decoder == "FPN" else dict(encoder_output_stride=16)
    model = getattr(smp, decoder)(f"tu-{name}", encoder_weights=None, classes=3, **kwargs, **_kwargs(name, size))
    model = randomize_bn_stats(model).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (1, 3, *size) and rel_err(y, convert_to_deploy(model)(x)) <= TOL[torch.float32]


def test_repmlpnet_refuses_output_stride_as_timm_refuses_unknown_arguments():
    with pytest.raises(TypeError, match="output_stride"):
        smp.DeepLabV3Plus("tu-repmlpnet_t224", encoder_weights=None, **_kwargs("repmlpnet_t224", SIZES[-1]))
