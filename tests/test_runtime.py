"""Runtimes and layouts: every runtime, on NCHW and channels_last inputs, gives eager PyTorch's NCHW outputs for every
family; weights are stored contiguous and each part runs in its input's layout; outputs follow the caller's layout."""

import pytest
import timm
import torch
from conftest import SMALL, rel_err
from test_repmlpnet import TINY

from repmlp import convert_to_deploy, load_checkpoint, save_checkpoint
from repmlp.models import model_input_size
from repmlp.models._base import NCHWStage
from repmlp.runtime import RUNTIMES, in_runtime
from repmlp.verify import TOLERANCES, randomize_bn_stats

# small members of each family (the suite's sizes); RepMLPNet runs NCHW inside, the others NHWC
FAMILIES = {
    "repmlp_res50_light_224": SMALL["repmlp_res50"],  # 64x64, 4x4 partitions, a quarter of the preset's widths
    "repmlpnet_t224": TINY,
    "repmlp_fmnist_mlp": {},
}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _forms(name: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    train = randomize_bn_stats(timm.create_model(name, **FAMILIES[name])).eval()
    x = torch.randn(2, *model_input_size(train), generator=torch.Generator().manual_seed(0))
    return train, convert_to_deploy(train), x


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, *_forms(request.param)


@pytest.mark.parametrize("runtime", [r for r in RUNTIMES if r not in ("compile", "openvino")])  # see below
def test_runtime_and_layout_give_eager_nchw_outputs(family, runtime):
    name, train, deploy, x = family
    with torch.inference_mode():
        expected = {"train": train(x), "deploy": deploy(x)}
    assert rel_err(expected["train"], expected["deploy"]) <= 1e-5
    for form, model in (("train", train), ("deploy", deploy)):
        for layout in LAYOUTS.values():
            xin = x.contiguous(memory_format=layout)
            run = in_runtime(model, runtime, xin)
            assert run.max_rel_err <= 1e-5
            assert rel_err(expected[form], run(xin)) <= 1e-5, (name, form, runtime, layout)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,layout", [(name, "nhwc" if name.startswith("repmlp_res50") else "nchw") for name in sorted(FAMILIES)]
)  # inductor compiles slowly: one case per family, the RepMLP-ResNet (NHWC inside) fed channels_last
def test_compiled_deploy_forms_give_eager_nchw_outputs(name, layout):
    """torch.compile (inductor, frozen weights) of each family's deploy form."""
    _, deploy, x = _forms(name)
    with torch.inference_mode():
        expected = deploy(x)
    xin = x.contiguous(memory_format=LAYOUTS[layout])
    assert rel_err(expected, in_runtime(deploy, "compile", xin)(xin)) <= 1e-5


def test_runtime_refuses_unknown_names_and_wrong_outputs(family):
    _, _, deploy, x = family
    with pytest.raises(ValueError, match="runtime must be one of"):
        in_runtime(deploy, "tensorrt", x)
    with pytest.raises(RuntimeError, match="differ from eager"):
        in_runtime(deploy, "eager", x, tolerance=-1.0)
    with pytest.raises(ValueError, match="onnxruntime runtime runs float32"):
        in_runtime(deploy, "onnxruntime", x, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_is_checked_with_its_tolerance(family, dtype):
    """A float32 deploy form run in bf16/fp16 (a copy cast once; the model itself stays float32), checked per element
    against itself in float32 with the dtype's tolerance; it really ran in the dtype (errors above float32's)."""
    _, _, deploy, x = family
    run = in_runtime(deploy, "eager", x, dtype=dtype)
    out = run(x)
    assert run.dtype == dtype and out.dtype == dtype and torch.isfinite(out).all()
    assert TOLERANCES[torch.float32] < run.max_rel_err <= TOLERANCES[dtype]
    assert next(deploy.parameters()).dtype == torch.float32


def test_openvino_is_checked_in_its_precision():
    """OpenVINO (one tiny model, one size): float32 against eager PyTorch with float32's tolerance at any batch; bf16
    with bf16's where the CPU has it (AVX512-BF16, AMX), else refused rather than quietly run in float32."""
    pytest.importorskip("openvino")
    from test_benchmark import tiny_model

    deploy = convert_to_deploy(randomize_bn_stats(tiny_model()).eval())
    x = torch.randn(2, 3, 16, 16)
    run = in_runtime(deploy, "openvino", x)
    assert run.max_rel_err <= TOLERANCES[torch.float32] and run.dtype == torch.float32
    x3 = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(deploy(x3), run(x3)) <= TOLERANCES[torch.float32]
    import openvino

    if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        bf16 = in_runtime(deploy, "openvino", x, dtype=torch.bfloat16)
        assert TOLERANCES[torch.float32] < bf16.max_rel_err <= TOLERANCES[torch.bfloat16]
    else:
        with pytest.raises(ValueError, match="OpenVINO runs f32 on this CPU when asked for bf16"):
            in_runtime(deploy, "openvino", x, dtype=torch.bfloat16)


def _conv_input_layouts(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[bool, bool]]:
    """Per conv whose input's two layouts differ: (whether its input came channels_last, whether its part of the model
    runs channels_last: the model's layout, but NCHW in an NCHWStage)."""
    nchw = [name for name, m in model.named_modules() if isinstance(m, NCHWStage)]
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            expected = model.channels_last and not any(name.startswith(part + ".") for part in nchw)

            def record(module, args, name=name, expected=expected):
                nhwc, nchw_ = args[0].is_contiguous(memory_format=torch.channels_last), args[0].is_contiguous()
                if nhwc != nchw_:
                    seen[name] = (nhwc, expected)

            hooks.append(m.register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_weights_are_stored_contiguous_and_parts_run_in_their_layout(family, tmp_path):
    """Every weight is contiguous (``state_dict()`` saves as it is) in train, converted, deploy-built and loaded
    models; the layout each part runs in is set by its input (channels_last in the model, NCHW in an NCHWStage)."""
    name, train, deploy, x = family
    built = timm.create_model(name, deploy=True, **FAMILIES[name])
    path = tmp_path / "deploy.safetensors"
    save_checkpoint(deploy, path)
    load_checkpoint(built, path)
    assert train.channels_last == (name != "repmlpnet_t224")
    for model in (train, deploy, built):
        assert all(t.is_contiguous() for t in model.state_dict().values())
        layouts = _conv_input_layouts(model, x)
        assert layouts and all(seen == expected for seen, expected in layouts.values()), layouts
    expected_parts = {e for _, e in _conv_input_layouts(train, x).values()}
    assert expected_parts == ({True, False} if "res50" in name else {train.channels_last})  # res50: c5 runs NCHW


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_outputs_keep_the_callers_layout(family, layout):
    """forward_features returns the caller's layout (NCHW for NCHW); logits are (N, classes) either way."""
    _, _, deploy, x = family
    xin = x.contiguous(memory_format=LAYOUTS[layout])
    with torch.inference_mode():
        features, logits = deploy.forward_features(xin), deploy(xin)
        reference = deploy.forward_features(x)
    expected = torch.contiguous_format if xin.is_contiguous() else LAYOUTS[layout]  # 1-channel inputs: both
    assert features.is_contiguous(memory_format=expected) and torch.equal(features, reference)
    assert logits.shape == (x.shape[0], deploy.num_classes) and logits.is_contiguous()
