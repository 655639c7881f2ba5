"""ONNX export of deploy forms: onnxruntime agrees with PyTorch, every tensor has rank <= 5, train forms refused."""

import shlex
from pathlib import Path

import pytest
import timm
import torch
from conftest import load_tool, rel_err
from test_benchmark import tiny_model
from test_repmlpnet import TINY
from torch import nn

from benchmarks.emulation import authors_deploy_form
from repmlp import RepMLP, convert_to_deploy
from repmlp.data import FASHION_MNIST_ROOT
from repmlp.models import model_input_size
from repmlp.verify import randomize_bn_stats

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from repmlp.export import check_ranks, export_onnx  # noqa: E402
from repmlp.int8 import onnx_batch_size  # noqa: E402
from repmlp.layers import graph_layout  # noqa: E402


def _deploy(model):
    return convert_to_deploy(randomize_bn_stats(model, seed=1).eval())


def _block():
    return nn.Sequential(RepMLP(8, 16, 12, 10, 6, 5, reparam_conv_k=(1, 3), fc3_groups=4), nn.ReLU())


@pytest.mark.slow
def test_resnet_variant_round_trip(tmp_path):
    # the Light RepMLP-ResNet at a reduced size (64x64 input, 4x4 partitions, narrow), 10 classes
    narrow = dict(img_size=64, partition=4, widths=(32, 64, 128, 256), num_classes=10)
    model = timm.create_model("repmlp_res50_light_224", **narrow)
    report = export_onnx(_deploy(model), tmp_path / "light.onnx", batch_size=2)
    assert report.input_shape == (2, 3, 64, 64)
    assert report.max_rank <= 5 and report.max_rel_err <= 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not timm.list_models("repmlpnet*"), reason="no RepMLPNet variants registered")
def test_repmlpnet_variant_round_trip(tmp_path):
    model = timm.create_model(timm.list_models("repmlpnet*")[0], **TINY)  # the fixtures' small RepMLPNet
    report = export_onnx(_deploy(model), tmp_path / "repmlpnet.onnx")
    assert report.input_shape == (1, 3, 64, 64)
    assert report.max_rank <= 5 and report.max_rel_err <= 1e-4


@pytest.mark.parametrize("name", ["tiny_model", "repmlpnet"])
def test_graph_layout_is_the_same_function(name):
    # RepMLPNet at 64x64: shared FC3 with 1 to 128 channel sets, FFN 1x1 convs as Conv2d
    model = (
        tiny_model()
        if name == "tiny_model"
        else timm.create_model("repmlpnet_t224", img_size=64, partitions=(16, 8, 4, 2), num_classes=10)
    )
    model = _deploy(model).double()
    x = torch.randn(2, *model_input_size(model), dtype=torch.float64)
    with graph_layout(model):
        assert sum(getattr(m, "graph_layout", False) for m in model.modules()) >= 2
        y = model(x)
    assert not any(getattr(m, "graph_layout", False) for m in model.modules())  # restored
    assert rel_err(model(x), y) <= 1e-12


def test_train_form_is_refused(tmp_path):
    with pytest.raises(ValueError, match="training-only modules"):
        export_onnx(randomize_bn_stats(_block()).eval(), tmp_path / "train.onnx", input_size=(8, 12, 10))
    assert not (tmp_path / "train.onnx").exists()


def test_six_dimensional_partitioning_is_rejected(tmp_path):
    # the authors' way of partitioning: a 6-D reshape/permute
    with pytest.raises(ValueError, match="rank > 5"):
        export_onnx(authors_deploy_form(_deploy(_block())), tmp_path / "authors.onnx", input_size=(8, 12, 10))


def _graph(shape):
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    return onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]))


def test_check_ranks():
    assert check_ranks(_graph([1, 2, 3, 4, 5])) == 5
    with pytest.raises(ValueError, match="rank > 5"):
        check_ranks(_graph([1, 2, 3, 4, 5, 6]))


def test_export_tool(tmp_path, capsys):
    tool = load_tool("export_onnx")
    out = tmp_path / "tiny.onnx"
    args = ["--model", "test_benchmark:tiny_model", "--output", str(out), "--batch-size", "2", "--static-batch"]
    assert tool.main(args) == 0
    assert out.stat().st_size > 0 and "rank <= 5" in capsys.readouterr().out
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def _help_examples() -> list[str]:
    from repmlp.cli import export_onnx as tool

    doc = tool.__doc__
    return [line.strip() for line in doc.splitlines() if line.strip().startswith("python tools/export_onnx.py")]


@pytest.mark.slow
@pytest.mark.parametrize("example", _help_examples(), ids=["int8_static_shipped", "padded_size", "openvino"])
def test_help_examples_do_what_they_say(example, tmp_path, capsys):
    """Each example of ``export_onnx.py --help``, as written (plus --output). The padded size once failed in
    onnxruntime: the padding became a crop in the graph (its ceil division traced as ONNX's truncating Div). Every
    file takes any batch, as timm's ONNX export writes it (checked at two batches)."""
    openvino = "--format openvino" in example
    if openvino:
        pytest.importorskip("openvino")
    if "--pretrained" in example and not Path(FASHION_MNIST_ROOT).is_dir():
        pytest.skip("Fashion-MNIST not installed here: apt-get install -y dataset-fashion-mnist")
    out = tmp_path / ("model.xml" if openvino else "model.onnx")
    assert load_tool("export_onnx").main([*shlex.split(example)[2:], "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "any batch (checked at" in printed
    assert ("RANDOM weights" in printed) == ("--pretrained" not in example)
    if "--quantize static" in example:
        assert "data    fashion_mnist" in printed and "static int8" in printed and onnx_batch_size(out) is None
        assert "on 256 fashion_mnist:/usr/share/datasets/fashion-mnist (val) inputs" in printed
    if openvino:
        assert out.with_suffix(".bin").stat().st_size > 0 and "OpenVINO IR" in printed
    else:
        assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_a_failed_check_writes_nothing(tmp_path):
    """The file is exported under a temporary name and renamed only once checked: an earlier file stays as it was."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    with pytest.raises(RuntimeError, match="model.onnx not written"):
        export_onnx(_deploy(_block()), out, input_size=(8, 12, 10), tolerance=-1.0)  # no error can be below -1
    assert out.read_bytes() == b"an earlier export" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    export_onnx(_deploy(_block()), out, input_size=(8, 12, 10))
    assert onnx.load(str(out)).graph.input[0].name == "input"
