"""Property tests of every re-parameterization identity, per element, float32 and float64."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, rel_err
from torch import nn

from repmlp import ops
from repmlp.verify import randomize_bn_stats

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cin,cout,k,groups,bias", [(4, 6, 3, 2, False), (8, 8, 1, 1, True), (6, 3, 5, 3, False)])
def test_fuse_bn_into_conv(dtype, cin, cout, k, groups, bias):
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)
    bn = randomize_bn_stats(nn.BatchNorm2d(cout), seed=1)
    ref = nn.Sequential(conv, bn).eval().to(dtype)
    w, b = ops.fuse_bn(conv.weight, conv.bias, *ops.bn_affine(bn))
    x = torch.randn(2, cin, 7, 5, dtype=dtype)
    y = F.conv2d(x, w.to(dtype), b.to(dtype), padding=k // 2, groups=groups)
    assert rel_err(ref(x), y) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fuse_bn_into_linear(dtype):
    fc, bn = nn.Linear(12, 20), randomize_bn_stats(nn.BatchNorm1d(20), seed=2)
    ref = nn.Sequential(fc, bn).eval().to(dtype)
    w, b = ops.fuse_bn(fc.weight, fc.bias, *ops.bn_affine(bn))
    x = torch.randn(5, 12, dtype=dtype)
    assert rel_err(ref(x), F.linear(x, w.to(dtype), b.to(dtype))) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_fold_preceding_bn(dtype, bias):
    bn, fc = randomize_bn_stats(nn.BatchNorm1d(12), seed=3), nn.Linear(12, 7, bias=bias)
    ref = nn.Sequential(bn, fc).eval().to(dtype)
    w, b = ops.fold_preceding_bn(fc.weight, fc.bias, *ops.bn_affine(bn))
    x = torch.randn(5, 12, dtype=dtype)
    assert rel_err(ref(x), F.linear(x, w.to(dtype), b.to(dtype))) <= TOL[dtype]


@pytest.mark.parametrize("k,size", [(1, 5), (3, 7), ((1, 3), (5, 5)), (5, 5)])
def test_pad_kernel_keeps_the_function(k, size):
    kh, kw = (k, k) if isinstance(k, int) else k
    kernel = torch.randn(4, 3, kh, kw, dtype=torch.float64)
    padded = ops.pad_kernel(kernel, size)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    sh, sw = padded.shape[-2:]
    ref = F.conv2d(x, kernel, padding=(kh // 2, kw // 2))
    assert rel_err(ref, F.conv2d(x, padded, padding=(sh // 2, sw // 2))) <= 1e-12


def test_pad_kernel_rejects_uncentred_sizes():
    with pytest.raises(ValueError, match="centre-pad"):
        ops.pad_kernel(torch.zeros(1, 1, 3, 3), 4)


@pytest.mark.parametrize("k,d", [(3, 2), (5, 3), (3, (1, 2))])
def test_dilate_kernel(k, d):
    kernel = torch.randn(4, 3, k, k, dtype=torch.float64)
    dh, dw = (d, d) if isinstance(d, int) else d
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64)
    ref = F.conv2d(x, kernel, padding=(dh * (k - 1) // 2, dw * (k - 1) // 2), dilation=(dh, dw))
    dense = ops.dilate_kernel(kernel, d)
    out = F.conv2d(x, dense, padding=(dense.shape[-2] // 2, dense.shape[-1] // 2))
    assert rel_err(ref, out) <= 1e-12


def _partition_conv(x, kernel, groups, dilation):
    kh, kw = kernel.shape[-2:]
    dh, dw = dilation
    return F.conv2d(x, kernel, padding=(dh * (kh - 1) // 2, dw * (kw - 1) // 2), dilation=dilation, groups=groups)


# (C, O, groups, kernel (kh, kw), dilation, h, w): h != w, C != O, kernels larger than the partition
CONV_CASES = [
    (4, 4, 1, (3, 3), (1, 1), 5, 5),
    (4, 8, 2, (3, 3), (1, 1), 6, 4),
    (6, 3, 3, (5, 5), (1, 1), 4, 7),
    (8, 8, 8, (7, 7), (1, 1), 3, 3),  # kernel larger than the partition, depthwise
    (4, 6, 2, (9, 9), (1, 1), 3, 5),
    (4, 4, 2, (3, 3), (2, 2), 6, 5),  # dilated
    (2, 4, 1, (3, 5), (2, 1), 5, 6),  # non-square kernel, anisotropic dilation
    (3, 3, 1, (1, 1), (1, 1), 1, 4),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,o,g,k,d,h,w", CONV_CASES)
def test_conv_to_fc_matches_conv_on_a_partition(dtype, c, o, g, k, d, h, w):
    kernel = torch.randn(o, c // g, *k, dtype=dtype)
    x = torch.randn(3, c, h, w, dtype=dtype)
    ref = _partition_conv(x, kernel, g, d)
    m = ops.conv_to_fc(kernel, h, w, g, d).to(dtype)  # (g, o/g*h*w, c/g*h*w)
    xg = x.reshape(3, g, -1).transpose(0, 1)
    y = torch.bmm(xg, m.transpose(1, 2)).transpose(0, 1).reshape(3, o, h, w)
    assert m.shape == (g, o // g * h * w, c // g * h * w)
    assert rel_err(ref, y) <= TOL[dtype]


def test_conv_to_fc_entries_are_kernel_values_or_zero():
    kernel = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    m = ops.conv_to_fc(kernel, 4, 4, groups=2)
    values = set(kernel.flatten().tolist()) | {0.0}
    assert set(m.flatten().tolist()) <= values


@pytest.mark.parametrize("shape,groups,msg", [((4, 2, 2, 2), 1, "odd"), ((4, 2, 3, 3), 3, "groups")])
def test_conv_to_fc_rejects(shape, groups, msg):
    with pytest.raises(ValueError, match=msg):
        ops.conv_to_fc(torch.zeros(shape), 4, 4, groups)


def test_bn_affine_without_affine_params():
    bn = nn.BatchNorm2d(3, affine=False)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    scale, shift = ops.bn_affine(bn)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ref = bn.double().eval()(x)
    assert rel_err(ref, x * scale[:, None, None] + shift[:, None, None]) <= 1e-12


@pytest.mark.parametrize("k,d", list(itertools.product([1, 3], [1, 2])))
def test_conv_to_fc_is_float64(k, d):
    assert ops.conv_to_fc(torch.randn(2, 2, k, k), 4, 4, 1, d).dtype == torch.float64
