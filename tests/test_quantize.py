"""QAT on the equivalent FC3: the function equals the conversion exactly and reaches every branch; fake quantization
is onnxruntime's; the QAT forward is the fake-quantized deploy form; the authors' FC3 BN inserts and folds exactly."""

import copy

import numpy as np
import pytest
import torch
from conftest import rel_err

from repmlp import RepMLP, randomize_bn_stats
from repmlp.models.repmlpnet import RepMLPBlock
from repmlp.quantize import (
    FakeQuantFC3,
    enable_fc3_qat,
    equivalent_fc3,
    fake_quantize_activation,
    fake_quantize_weight,
    fold_fc3_bn,
    insert_fc3_bn,
    prepare_qat,
    remove_fake_quant,
    weight_qmax,
)

# (in, out, H, W, h, w, branches, groups, reduction): h != w, in != out, groups, dilation, a kernel larger than the
# partition, one partition (no global perceptron), no local perceptron
V1 = [
    (8, 12, 12, 10, 6, 5, (1, 3, (3, 2)), 4, 2),
    (6, 4, 7, 7, 7, 7, (1, 3, 5, 9), 2, 1),
    (4, 8, 8, 12, 4, 6, (3,), 1, 1),
    (4, 4, 4, 4, 2, 2, None, 2, 1),
]
# (channels, h, w, sharesets, branches)
NET = [(16, 6, 4, 4, (1, 3)), (8, 5, 5, 8, (3,)), (12, 4, 6, 3, ())]


def _v1(case):
    c, o, H, W, h, w, k, g, r = case
    return RepMLP(c, o, H, W, h, w, reparam_conv_k=k, fc3_groups=g, fc1_fc2_reduction=r)


def _blocks():
    return [pytest.param(lambda c=c: _v1(c), id=f"v1-{i}") for i, c in enumerate(V1)] + [
        pytest.param(lambda c=c: RepMLPBlock(c[0], c[1], c[2], c[3], c[4]), id=f"net-{i}") for i, c in enumerate(NET)
    ]


def _input(block, n=3, dtype=torch.float64):
    if isinstance(block, RepMLP):
        return torch.randn(n, block.in_channels, block.H, block.W, dtype=dtype)
    return torch.randn(n, block.channels, 2 * block.h, block.w, dtype=dtype)  # two partitions


def _fc3(block):
    return (block.partition_perceptron if isinstance(block, RepMLP) else block.channel_perceptron).fc3


@pytest.mark.parametrize("make", _blocks())
def test_equivalent_fc3_is_the_converted_fc3(make):
    block = randomize_bn_stats(make(), seed=3).double()
    weight, bias = equivalent_fc3(block)
    deploy = copy.deepcopy(block)
    deploy.reparameterize()
    assert weight.dtype == torch.float64 and weight.shape == _fc3(deploy).weight.shape
    assert rel_err(_fc3(deploy).weight, weight) <= 1e-10 and rel_err(_fc3(deploy).bias, bias) <= 1e-10
    assert (weight - _fc3(deploy).weight).abs().max() <= 1e-10 * weight.abs().max()


@pytest.mark.parametrize("make", _blocks())
def test_equivalent_fc3_passes_gradients_to_every_branch(make):
    block = randomize_bn_stats(make(), seed=4).double()
    weight, bias = equivalent_fc3(block)
    ((weight * torch.randn_like(weight)).sum() + (bias * torch.randn_like(bias)).sum()).backward()
    perceptron = "partition_perceptron" if isinstance(block, RepMLP) else "channel_perceptron"
    params = [(n, p) for n, p in block.named_parameters() if n.startswith((perceptron, "local_perceptron"))]
    assert len(params) >= 3
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in params), [
        n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0
    ]


@pytest.mark.parametrize("reduce_range", [False, True])
def test_fake_quantized_weights_are_onnxruntimes(reduce_range):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    weight = torch.randn(6, 40) * torch.logspace(-2, 1, 6)[:, None]  # rows of very different ranges
    fake = fake_quantize_weight(weight, weight_qmax(reduce_range))
    for row, fake_row in zip(weight.numpy(), fake):
        zero_point, scale, q = quantize_data(row, TensorProto.INT8, True, reduce_range)[-3:]
        assert zero_point == 0
        np.testing.assert_allclose(fake_row.numpy(), scale * q.astype(np.float32), rtol=1e-6, atol=0)
    weight.requires_grad_(True)
    fake_quantize_weight(weight).sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # straight through


def test_fake_quantized_activations_are_onnxruntimes_dynamic_quantization():
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 50])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 50])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx.checker.check_model(model)
    for x in (torch.randn(4, 50) * 3 + 1, torch.rand(4, 50) + 0.5, -torch.rand(4, 50)):  # ranges with and without 0
        ours = fake_quantize_activation(x)
        torch.testing.assert_close(
            ours, torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), rtol=0, atol=1e-6 * x.abs().max().item()
        )


@pytest.mark.parametrize("make", _blocks())
def test_qat_forward_is_the_fake_quantized_deploy_form(make):
    block = randomize_bn_stats(make(), seed=5).double().eval()
    x = _input(block)
    keys = set(block.state_dict())
    qat = copy.deepcopy(block)
    assert enable_fc3_qat(qat, reduce_range=True) == 1 and enable_fc3_qat(qat) == 0  # idempotent
    deploy = copy.deepcopy(block)
    deploy.reparameterize()
    perceptron = deploy.partition_perceptron if isinstance(deploy, RepMLP) else deploy.channel_perceptron
    perceptron.fc3 = FakeQuantFC3(perceptron.fc3, weight_qmax(True))
    y = qat(x)
    assert rel_err(deploy(x), y) <= 1e-10
    assert rel_err(block(x), y) > 1e-4  # quantization noise is there
    assert set(qat.state_dict()) == keys
    assert rel_err(y, copy.deepcopy(qat)(x)) == 0  # a copy (EMA, conversion) keeps its own QAT forward
    y.pow(2).sum().backward()
    assert all(p.grad is not None for n, p in qat.named_parameters() if "local_perceptron" in n)
    assert remove_fake_quant(qat) == 1 and rel_err(block(x), qat(x)) == 0


@pytest.mark.parametrize("make", _blocks())
def test_fc3_bn_starts_as_identity_and_folds_exactly(make):
    block = randomize_bn_stats(make(), seed=6).double().eval()
    block.reparameterize()
    x = _input(block, n=8)
    y = block(x)
    assert insert_fc3_bn(block, [x, _input(block, n=8)]) == 1
    assert isinstance(_fc3(block), FakeQuantFC3) and rel_err(y, block(x)) < 0.05  # fake-quantized FC3
    remove_fake_quant(block)
    assert rel_err(y, block(x)) <= 1e-10  # gamma = sqrt(var + eps), beta = mean: the identity in eval mode
    randomize_bn_stats(block, seed=7)  # as after fine-tuning
    y = block(x)
    assert fold_fc3_bn(block) == 1 and block.deploy
    assert rel_err(y, block(x)) <= 1e-10


def test_prepare_qat_refuses_the_wrong_form_or_mode():
    train, deploy = _v1(V1[0]), _v1(V1[0])
    deploy.reparameterize()
    with pytest.raises(ValueError, match="'equivalent_fc3' needs a train-form model"):
        prepare_qat(deploy, "equivalent_fc3")
    with pytest.raises(ValueError, match="'fc3_bn' needs a deploy-form model"):
        prepare_qat(train, "fc3_bn", [_input(train, dtype=torch.float32)])
    with pytest.raises(ValueError, match="QAT mode must be one of"):
        prepare_qat(train, "int4")
    assert prepare_qat(train, "none") == 0
