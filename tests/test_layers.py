"""The RepMLP block's parts: grouped FC3, partitions, bad constructor arguments and inputs. Its conversion is in
test_convert.py, loading the authors' block files in test_checkpoint.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from repmlp import RepMLP
from repmlp.layers import GroupedLinear, partition, unpartition

# --- the authors' fixtures -------------------------------------------------------------------------


# --- building blocks -------------------------------------------------------------------------------


@pytest.mark.parametrize("graph_layout", [False, True])  # one batched matmul, or one linear per group
@pytest.mark.parametrize("groups,bias", [(1, True), (4, False), (4, True)])
def test_grouped_linear_equals_grouped_1x1_conv(groups, bias, graph_layout):
    fc = GroupedLinear(32, 48, groups, bias=bias)
    fc.graph_layout = graph_layout
    x = torch.randn(5, 32)
    ref = F.conv2d(x[..., None, None], fc.weight[..., None, None], fc.bias, groups=groups).flatten(1)
    assert rel_err(ref, fc(x)) <= 1e-6


def test_partition_round_trip_and_order():
    x = torch.arange(2 * 3 * 6 * 10).reshape(2, 3, 6, 10).float()
    p = partition(x, 3, 5)
    assert p.shape == (8, 3, 3, 5)
    assert torch.equal(p[1], x[0, :, 0:3, 5:10]) and torch.equal(p[6], x[1, :, 3:6, 0:5])
    assert torch.equal(unpartition(p, 2, 2, 2), x)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(H=0), "positive"),
        (dict(H=12, h=5, fc1_fc2_reduction=7), r"fc1_fc2_reduction=7 must divide C \* hp \* wp = 48"),
        (dict(reparam_conv_k=(2,)), "odd"),
        (dict(reparam_conv_k=(3, (4, 1))), "odd"),
        (dict(fc3_groups=3), "fc3_groups=3"),
        (dict(out_channels=6, fc3_groups=4), "fc3_groups=4"),
        (dict(fc1_fc2_reduction=5), "fc1_fc2_reduction"),
        (dict(h=0), "positive"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = dict(in_channels=8, out_channels=8, H=12, W=10, h=6, w=5, reparam_conv_k=(1, 3), fc3_groups=2)
    with pytest.raises(ValueError, match=match):
        RepMLP(**{**args, **kwargs})


@pytest.mark.parametrize("shape", [(2, 8, 12, 12), (2, 4, 12, 10), (8, 12, 10)])
def test_bad_input_shape(shape):
    block = RepMLP(8, 8, 12, 10, 6, 5, reparam_conv_k=(1, 3))
    with pytest.raises(ValueError, match=r"built for inputs \(N, 8, 12, 10\)"):
        block(torch.randn(shape))
