"""The converter on the RepMLP block: train form == deploy form per element (float32 and float64, h != w, in != out,
groups, kernel sizes, dilations, one partition, no local perceptron), idempotence, the copy it makes, half
precision. The model-level routes are in test_zoo.py, the operations in test_ops.py."""

import copy
import itertools

import pytest
import timm
import torch
from conftest import TOL, rel_err

from repmlp import RepMLP, convert_to_deploy
from repmlp.verify import randomize_bn_stats

# (C, O, H, W, h, w, kernels, reduction, groups)
BLOCK_CASES = [
    (8, 8, 12, 10, 6, 5, (1, 3, 5), 2, 4),  # the fixture's config: h != w
    (8, 16, 12, 12, 6, 6, (1, 3, 5), 1, 4),  # in != out (the authors' conversion is wrong here)
    (12, 6, 8, 12, 4, 3, (3,), 1, 3),  # in > out, 3 groups
    (4, 4, 6, 6, 3, 3, (1, 5, 7), 1, 2),  # kernels larger than the partition
    (6, 6, 7, 7, 7, 7, (1, 3), 1, 1),  # a single partition: no global perceptron
    (4, 8, 8, 8, 4, 4, (1, (3, 2), (3, 3)), 2, 1),  # dilated branches
    (4, 4, 8, 6, 4, 3, (), 1, 2),  # no local perceptron
]


def _block(case, dtype=torch.float32, seed=0):
    c, o, H, W, h, w, k, r, g = case
    torch.manual_seed(seed)
    block = RepMLP(c, o, H, W, h, w, reparam_conv_k=k, fc1_fc2_reduction=r, fc3_groups=g)
    return randomize_bn_stats(block, seed).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", BLOCK_CASES)
def test_train_and_deploy_forms_agree(case, dtype):
    block = _block(case, dtype)
    x = torch.randn(3, case[0], case[2], case[3], dtype=dtype)
    deploy = convert_to_deploy(block)
    assert rel_err(block(x), deploy(x)) <= TOL[dtype]


@pytest.mark.parametrize("case", BLOCK_CASES[:3])
def test_reparameterize_is_idempotent_and_drops_training_modules(case):
    block = _block(case)
    x = torch.randn(2, case[0], case[2], case[3])
    block.reparameterize()
    y = block(x)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    block.reparameterize()
    assert torch.equal(block(x), y)
    assert all(torch.equal(state[k], v) for k, v in block.state_dict().items())
    assert block.local_perceptron is None and block.partition_perceptron.bn is None
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in block.modules())
    built = RepMLP(*case[:6], reparam_conv_k=case[6], fc1_fc2_reduction=case[7], fc3_groups=case[8], deploy=True)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in state.items()}


def test_timm_reparameterize_model_uses_the_block():
    block = _block(BLOCK_CASES[0])
    model = torch.nn.Sequential(block, torch.nn.ReLU())
    fused = timm.utils.reparameterize_model(model)
    x = torch.randn(2, 8, 12, 10)
    assert fused[0].deploy and fused[0].local_perceptron is None
    assert rel_err(model(x), fused(x)) <= 1e-5


@pytest.mark.parametrize("inference_mode", [False, True], ids=["ordinary", "inference_mode"])
def test_convert_leaves_input_untouched_and_uses_running_stats(inference_mode):
    """Also for a model built and converted under torch.inference_mode (its tensors keep no version counter):
    the copy shares no tensor with it."""
    with torch.inference_mode(inference_mode):
        block = _block(BLOCK_CASES[0]).train()
        before = copy.deepcopy(block.state_dict())
        deploy = convert_to_deploy(block)
    assert block.training and not deploy.training
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())
    assert all(p.grad_fn is None for p in deploy.parameters())
    ours = {t.data_ptr() for t in itertools.chain(block.parameters(), block.buffers())}
    assert not ours & {t.data_ptr() for t in itertools.chain(deploy.parameters(), deploy.buffers())}
    x = torch.randn(2, 8, 12, 10)
    with torch.inference_mode(inference_mode):
        assert rel_err(block.eval()(x), deploy(x)) <= 1e-5


class _OwnCopy(torch.nn.Identity):
    """A module with its own copy protocol: the converter must copy the tree with copy.deepcopy."""

    def __deepcopy__(self, memo):
        new = _OwnCopy()
        new.copied = True
        return new


@pytest.mark.parametrize("own_copy", [False, True])
def test_converted_copy_is_a_deep_copy(own_copy):
    """The copy keeps a tied module tied, carries hooks over to the copied modules, and shares nothing mutable."""
    block = _block(BLOCK_CASES[0])
    relu = torch.nn.ReLU()
    model = torch.nn.Sequential(block, relu, _OwnCopy() if own_copy else torch.nn.Identity(), relu)
    model.config = {"widths": [8]}
    seen = []
    model[1].register_forward_hook(lambda module, args, out: seen.append(module))
    deploy = convert_to_deploy(model)
    assert deploy[1] is deploy[3] and deploy[1] is not relu and deploy[0] is not block
    assert getattr(deploy[2], "copied", False) == own_copy
    assert deploy.config == model.config and deploy.config is not model.config
    assert deploy[0].deploy and not block.deploy
    deploy(torch.randn(1, 8, 12, 10))
    assert seen == [deploy[1], deploy[1]]
    (load_hook,) = deploy[0]._load_state_dict_pre_hooks.values()  # the authors' keys hook, bound to the copy
    assert load_hook.module() is deploy[0]


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_conversion(dtype, tol):
    """Half models convert in float64: each deploy weight is the exact value rounded once to the dtype."""
    block32 = _block(BLOCK_CASES[1])
    half = copy.deepcopy(block32).to(dtype)
    exact = convert_to_deploy(copy.deepcopy(half).double())  # the same (rounded) train weights, converted in float64
    deploy_half = convert_to_deploy(half)
    for (name, ref), got in zip(exact.state_dict().items(), deploy_half.state_dict().values()):
        assert got.dtype == dtype, name
        ulp = torch.finfo(dtype).eps * ref.abs() + torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
        assert ((got.double() - ref).abs() <= ulp).all(), name
    x = torch.randn(2, 8, 12, 12)  # against the fp32 train form
    assert rel_err(block32(x), deploy_half(x.to(dtype))) <= tol
    # a float32 train form to a half deploy form (convert_deploy --dtype): converted in float64, cast once
    cast_once = convert_to_deploy(block32, dtype=dtype)
    exact = convert_to_deploy(copy.deepcopy(block32).double())
    for (name, ref), got in zip(exact.state_dict().items(), cast_once.state_dict().values()):
        assert got.dtype == dtype and torch.equal(got, ref.to(dtype)), name
    assert next(block32.parameters()).dtype == torch.float32 and not block32.deploy
    assert rel_err(block32(x), cast_once(x.to(dtype))) <= tol
    with pytest.raises(ValueError, match="cannot convert in place"):
        convert_to_deploy(block32, inplace=True, dtype=dtype)
