"""Weights on disk and every way of loading them: safetensors with metadata, atomic writes, strict loads, clear
errors; (model form) x (file form) x (file origin) through load_checkpoint and create_model for one small model per
design; the authors' checkpoints and block fixtures; fine-tuning loads (other classes, other input channels)."""

import argparse
import itertools
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import CASES, REFERENCE, TINY_CIFAR, create, inputs, official_state_dict, rel_err, small_kwargs
from timm.utils import CheckpointSaver, ModelEmaV3

import repmlp
from repmlp import RepMLP
from repmlp.checkpoint import read_checkpoint, read_metadata, read_state_dict
from repmlp.sources import model_source
from repmlp.verify import randomize_bn_stats


def _block(deploy=False):
    torch.manual_seed(0)
    return randomize_bn_stats(repmlp.RepMLP(8, 8, 12, 10, 6, 5, (1, 3), 2, 4, deploy=deploy)).eval()


def test_round_trip_records_name_and_form(tmp_path):
    block = _block()
    path = tmp_path / "block.safetensors"
    repmlp.save_checkpoint(block, path, model_name="my_block")
    assert read_metadata(path) == {"model": "my_block", "form": "train", "format": "pt"}
    other = repmlp.RepMLP(8, 8, 12, 10, 6, 5, (1, 3), 2, 4)
    repmlp.load_checkpoint(other, path)
    assert all(torch.equal(a, b) for a, b in zip(block.state_dict().values(), other.state_dict().values()))
    deploy_path = tmp_path / "deploy.safetensors"
    repmlp.save_checkpoint(repmlp.convert_to_deploy(block), deploy_path)
    assert read_metadata(deploy_path)["form"] == "deploy"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_train_checkpoint_into_deploy_block_is_converted(tmp_path):
    block = _block()
    path = tmp_path / "block.safetensors"
    repmlp.save_checkpoint(block, path)
    deploy = repmlp.load_checkpoint(_block(deploy=True), path, train_model_factory=_block).eval()
    x = torch.randn(2, 8, 12, 10)
    assert ((block(x) - deploy(x)).abs().max() / block(x).abs().max()).item() <= 1e-5


def test_deploy_checkpoint_into_train_block_is_explained(tmp_path):
    path = tmp_path / "deploy.safetensors"
    repmlp.save_checkpoint(repmlp.convert_to_deploy(_block()), path)
    with pytest.raises(ValueError, match="deploy-form .* deploy=True"):
        repmlp.load_checkpoint(_block(), path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _block().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["partition_perceptron.fc3.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"missing keys \[partition_perceptron.fc3.weight\].*unexpected keys "
        r"\[extra.weight\]",
    ):
        repmlp.load_checkpoint(_block(), path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file_names_the_file(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(_block().state_dict(), path)
    else:
        repmlp.save_checkpoint(_block(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot read weights file .*weights{suffix}"):
        read_state_dict(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_state_dict("nope.safetensors")


def test_pth_is_read_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(ValueError, match="cannot read weights file"):
        read_state_dict(path)


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    repmlp.save_checkpoint(_block(), path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        repmlp.save_checkpoint(_block(), path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_wrong_values_are_refused_before_loading(tmp_path, caplog):
    """Integer tensors for float parameters and NaN/Inf are errors naming the tensors; fp16 loads with a note."""
    state = _block().state_dict()
    cases = {
        "int64": (
            {**state, "partition_perceptron.fc3.weight": state["partition_perceptron.fc3.weight"].long()},
            "integer tensors .*partition_perceptron.fc3.weight",
        ),
        "nan": (
            {**state, "partition_perceptron.fc3.weight": state["partition_perceptron.fc3.weight"] * float("nan")},
            "NaN or Inf values in .*partition_perceptron.fc3.weight",
        ),
    }
    for label, (bad, match) in cases.items():
        path = tmp_path / f"{label}.pth"
        torch.save(bad, path)
        before = path.read_bytes()
        with pytest.raises(ValueError, match=match):
            repmlp.load_checkpoint(_block(), path)
        assert path.read_bytes() == before
    repmlp.load_checkpoint(_block(), tmp_path / "nan.pth", allow_nonfinite=True)  # the debugging opt-out
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "fp16.pth")
    with caplog.at_level("WARNING", logger="repmlp"):
        repmlp.load_checkpoint(_block(), tmp_path / "fp16.pth")
    assert "lower precision" in caplog.text


def _write(model: torch.nn.Module, origin: str, path) -> str:
    if origin == "ours":
        path = path.with_suffix(".safetensors")
        repmlp.save_checkpoint(model, path)
    else:  # a plain torch.save of a state dict, as users and other trainers write
        path = path.with_suffix(".pth")
        torch.save(model.state_dict(), path)
    return str(path)


def _load(route: str, name: str, kwargs: dict, deploy: bool, path: str) -> torch.nn.Module:
    if route == "load_checkpoint":
        return repmlp.load_checkpoint(timm.create_model(name, deploy=deploy, **kwargs), path)
    return timm.create_model(name, deploy=deploy, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_load_routes(tmp_path, name, kwargs):
    """Every (model form) x (file form) x (file origin: ours, a plain torch.save of a state dict), through
    load_checkpoint and create_model(pretrained=True): a train-form file loads into either form (converted for
    a deploy-form model); a deploy-form file loads into a deploy-form model and is refused by a train-form one."""
    train = create(name, 3, **kwargs)
    x = inputs(train)
    expected = train(x)
    forms = dict(train=train, deploy=repmlp.convert_to_deploy(train))
    for (file_form, saved), origin in itertools.product(forms.items(), ("ours", "torch_save")):
        path = _write(saved, origin, tmp_path / f"{file_form}_{origin}")
        for deploy, route in itertools.product((False, True), ("load_checkpoint", "create_model")):
            if file_form == "deploy" and not deploy:
                with pytest.raises(ValueError, match="deploy-form .* cannot be recovered"):
                    _load(route, name, kwargs, deploy, path)
                continue
            model = _load(route, name, kwargs, deploy, path).eval()
            assert repmlp.is_deploy_form(model) == deploy
            assert rel_err(expected, model(x)) <= 1e-5, (file_form, origin, deploy, route)


def test_converting_on_load_leaves_the_callers_tensors_and_legacy_torch_files_load(tmp_path):
    """A train-form state dict converted for a deploy-form model (its train-form twin is built on the meta device
    and takes the dict's tensors) leaves the caller's tensors as they were; torch files in the pre-1.6 format (not
    memory-mapped, as zip files are) load too."""
    kwargs = {**small_kwargs("repmlp_cifar_mlp"), **TINY_CIFAR}
    train = create("repmlp_cifar_mlp", 5, **TINY_CIFAR)
    x, state = inputs(train), train.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    deploy = timm.create_model("repmlp_cifar_mlp", deploy=True, **kwargs)
    deploy.load_state_dict(repmlp.checkpoint_filter_fn(state, deploy))
    assert all(torch.equal(before[k], state[k]) for k in state)
    assert rel_err(train(x), deploy.eval()(x)) <= 1e-5
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = repmlp.load_checkpoint(
        timm.create_model("repmlp_cifar_mlp", deploy=True, **kwargs), tmp_path / "legacy.pth"
    )
    assert rel_err(train(x), legacy.eval()(x)) <= 1e-5


# the authors' checkpoints: their key layouts (tests/fixtures/official/keys_*.txt) with random values
AUTHORS = [
    ("repmlp_res50_light_g4_224", "RepMLP-Res50-light-224", "stage0.0.conv.weight"),
    ("repmlp_res50_bottleneck_224", "RepMLP-Res50-bottleneck-224", "stage0.0.conv.weight"),
    ("repmlpnet_t224", "RepMLPNet-T224", "conv_embedding.conv.weight"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,keys,stem", AUTHORS)
def test_the_authors_checkpoints(tmp_path, name, keys, stem):
    """Their train form loads into both of our forms (the deploy form converted from it); their inference form
    loads into our deploy form and is refused by our train form."""
    for form in ("train", "deploy"):
        state = official_state_dict(f"keys_{keys}_{form}.txt")
        path = tmp_path / f"{form}.pth"
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)  # as their DDP training saves
        overlay = dict(file=str(path))
        deploy = timm.create_model(name, pretrained=True, deploy=True, pretrained_cfg_overlay=overlay).eval()
        classifier = state[next(k for k in state if k.endswith(("linear.weight", "head.weight")))]
        assert torch.equal(deploy.get_classifier().weight, classifier)
        if form == "deploy":
            with pytest.raises(ValueError, match="deploy-form"):
                timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
            continue
        train = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
        assert torch.equal(train.stem.conv.weight, state[stem])
        assert repmlp.verify_equivalence(train, deploy, batch_size=1).passed


FINE_TUNE = CASES + [
    pytest.param("repmlp_fmnist_mlp", dict(deploy=True), id="repmlp_fmnist_mlp-deploy"),
    pytest.param("repmlpnet_t224", dict(small_kwargs("repmlpnet_t224"), deploy=True), id="repmlpnet-deploy"),
]


@pytest.mark.parametrize("name,kwargs", FINE_TUNE)
def test_fine_tuning_loads(tmp_path, caplog, name, kwargs):
    """Another num_classes (0 included), asked for, gives the model a fresh classifier and says so; another
    in_chans asked for adapts the first conv; everything else is loaded (a train-form file, so deploy-form models
    also convert). Not asked for, a classifier of another size is an error naming the num_classes that loads it."""
    kwargs = dict(kwargs)
    deploy = kwargs.pop("deploy", False)
    train = create(name, 4, **kwargs)
    path = _write(train, "ours", tmp_path / "weights")
    overlay = dict(file=path)
    reference = repmlp.convert_to_deploy(train) if deploy else train
    x = inputs(train)
    for num_classes in (train.num_classes + 3, 0):
        with caplog.at_level("WARNING", logger="repmlp"):
            model = timm.create_model(
                name, pretrained=True, deploy=deploy, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs
            ).eval()
        assert f"num_classes={num_classes} asked: a fresh classifier" in caplog.text
        assert model(x).shape == (2, num_classes or model.head_hidden_size)
        assert (
            rel_err(
                reference.forward_head(reference.forward_features(x), pre_logits=True),
                model.forward_head(model.forward_features(x), pre_logits=True),
            )
            <= 1e-5
        )
    chans = x.shape[1] + 2
    model = timm.create_model(
        name, pretrained=True, deploy=deploy, pretrained_cfg_overlay=overlay, in_chans=chans, **kwargs
    ).eval()
    assert model.stem.conv.weight.shape[1] == chans
    if x.shape[1] == 1:  # one channel spread evenly over the new ones: the same function on repeated input
        assert rel_err(reference(x), model(x.repeat(1, chans, 1, 1))) <= 1e-5


def test_wrong_files_are_clear_errors(tmp_path):
    train = create("repmlp_fmnist_mlp")
    other = timm.create_model("repmlp_cifar_mlp")
    path = _write(train, "ours", tmp_path / "fmnist")
    with pytest.raises(ValueError, match="does not match the model: missing keys"):
        repmlp.load_checkpoint(other, path)
    with pytest.raises(ValueError, match="pretrained_cfg_overlay"):
        timm.create_model("repmlp_res50_light_224", pretrained=True)


def _fixture(name):
    cfg = json.loads((REFERENCE / f"{name}_config.json").read_text())
    io = safetensors.torch.load_file(str(REFERENCE / f"{name}_io.safetensors"))
    return cfg, io, safetensors.torch.load_file(str(REFERENCE / f"{name}_train.safetensors"))


@pytest.mark.parametrize("name", ["v1_block", "v1_block_in8_out16"])
def test_official_train_state_dict_loads_as_is_and_converts(name):
    cfg, io, state = _fixture(name)
    block = RepMLP(**cfg).eval()
    block.load_state_dict(state)
    assert rel_err(io["y_train"], block(io["x"])) <= 1e-6
    block.reparameterize()
    assert rel_err(io["y_train"], block(io["x"])) <= 1e-6


def test_official_deploy_state_dict_loads_into_deploy_form():
    cfg, io, _ = _fixture("v1_block")
    block = RepMLP(**cfg, deploy=True).eval()
    block.load_state_dict(safetensors.torch.load_file(str(REFERENCE / "v1_block_deploy.safetensors")))
    assert rel_err(io["y_deploy"], block(io["x"])) <= 1e-6


# ------------------------------------------------------------------------------------------ trainers' files


def timm_train_checkpoint(tmp_path, with_args=True):
    """What timm's train.py writes: its CheckpointSaver's file, with train.py's arguments and an EMA model whose
    weights differ from the model's. Returns (path, model, ema model)."""
    torch.manual_seed(0)
    model = randomize_bn_stats(timm.create_model("repmlp_cifar_mlp", **TINY_CIFAR))
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    args = argparse.Namespace(model="repmlp_cifar_mlp", num_classes=10, model_kwargs=TINY_CIFAR, lr=0.1)
    saver = CheckpointSaver(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        args=args if with_args else None,
        model_ema=ema,
        checkpoint_dir=str(tmp_path),
    )
    saver.save_checkpoint(epoch=3, metric=0.25)
    return tmp_path / "last.pth.tar", model, ema.module


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_timm_train_py_checkpoint_loads_its_state_dict_or_its_ema(tmp_path, caplog):
    path, model, ema = timm_train_checkpoint(tmp_path)
    fresh = lambda: timm.create_model("repmlp_cifar_mlp", **TINY_CIFAR)  # noqa: E731
    with caplog.at_level("INFO", logger="repmlp"):
        assert _equal(repmlp.load_checkpoint(fresh(), path), model)
    assert (
        "a timm train.py checkpoint (arch repmlp_cifar_mlp, epoch 3, metric 0.25); loaded 'state_dict'" in caplog.text
    )
    assert "it also holds EMA weights 'state_dict_ema' (use_ema=True" in caplog.text
    assert _equal(repmlp.load_checkpoint(fresh(), path, use_ema=True), ema) and not _equal(ema, model)
    assert read_metadata(path) == {
        "model": "repmlp_cifar_mlp",
        "num_classes": "10",
        "model_kwargs": json.dumps(TINY_CIFAR),
    }
    overlay = dict(file=str(path))
    assert _equal(
        timm.create_model("repmlp_cifar_mlp", pretrained=True, pretrained_cfg_overlay=overlay, **TINY_CIFAR), model
    )
    deploy = model_source(None, path, form="deploy", use_ema=True)  # model and arguments: train.py's args
    assert "loaded 'state_dict_ema'" in deploy.weights and deploy.model.deploy
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(ema.eval()(x), deploy.model(x)) <= 1e-5


def test_timm_checkpoint_without_args_and_ema_requests_that_cannot_be_met(tmp_path):
    path, model, _ = timm_train_checkpoint(tmp_path, with_args=False)
    state, held = read_checkpoint(path)
    assert held.startswith("a timm CheckpointSaver checkpoint (arch puremlpnet, epoch 3")
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="use_ema=True, but .*plain.pth holds a plain state dict"):
        read_state_dict(tmp_path / "plain.pth", use_ema=True)
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "no_ema.pth")
    with pytest.raises(ValueError, match=r"holds no EMA weights \(a checkpoint with entries \['epoch', 'state_dict'\]"):
        read_state_dict(tmp_path / "no_ema.pth", use_ema=True)
    with pytest.raises(ValueError, match="--ema .* give the file"):
        model_source("repmlp_cifar_mlp", use_ema=True)


def test_a_namespace_is_all_that_is_unpickled_beyond_tensors(tmp_path):
    """timm's loader allows argparse.Namespace (train.py's args) and nothing else; what a Namespace holds is not let
    through either."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": _block().state_dict(), "args": argparse.Namespace(model="x", hook=Evil())}, path)
    with pytest.raises(
        ValueError, match="holds a posix.system object .* is not unpickled .*only argparse.Namespace is"
    ) as err:
        read_state_dict(path)
    assert "do not unpickle this file" in str(err.value) and "weights_only=False" not in str(err.value)
    torch.save({"state_dict": _block().state_dict(), "run": Path("runs/x")}, path)  # a harmless object of one's own
    with pytest.raises(ValueError, match=r"holds a pathlib\.\w*Path object .* If you trust it, .*weights_only=False"):
        read_state_dict(path)


@pytest.mark.parametrize("wrap", ["_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."])
def test_compile_and_ddp_prefixes_are_stripped(tmp_path, caplog, wrap):
    """A state dict of a torch.compile'd (``_orig_mod.``) or DDP (``module.``) model, wrapped in either order."""
    model = randomize_bn_stats(timm.create_model("repmlp_cifar_mlp", **TINY_CIFAR))
    assert all(k.startswith("_orig_mod.") for k in torch.compile(model).state_dict())  # lazy: nothing is compiled
    torch.save({f"{wrap}{k}": v for k, v in model.state_dict().items()}, tmp_path / "wrapped.pth")
    with caplog.at_level("INFO", logger="repmlp"):
        loaded = repmlp.load_checkpoint(timm.create_model("repmlp_cifar_mlp", **TINY_CIFAR), tmp_path / "wrapped.pth")
    assert _equal(loaded, model) and "classifier" not in caplog.text
    stripped = [w for w in ("'module.' (DistributedDataParallel)", "'_orig_mod.' (torch.compile)") if w[1:8] in wrap]
    assert f"stripped the {' and '.join(stripped)} prefix" in caplog.text


def test_a_file_in_another_layout_is_listed_not_adapted(tmp_path, caplog):
    """Keys under an unknown prefix: the strict load lists them; no fine-tuning adaptation (new classifier, global
    perceptrons for another grid) is claimed on the way."""
    model = timm.create_model("repmlp_cifar_mlp", **TINY_CIFAR)
    torch.save({f"net.{k}": v for k, v in model.state_dict().items()}, tmp_path / "prefixed.pth")
    with caplog.at_level("INFO", logger="repmlp"), pytest.raises(ValueError, match=r"unexpected keys \[net\."):
        repmlp.load_checkpoint(timm.create_model("repmlp_cifar_mlp", **TINY_CIFAR), tmp_path / "prefixed.pth")
    assert "partitions" not in caplog.text and "classifier" not in caplog.text


def test_a_training_state_is_refused_as_weights_naming_what_it_is(tmp_path):
    """tools/train.py's resume file is safetensors too (numbered tensors, the tree in its metadata)."""
    from repmlp.training.state import save_training_state

    block = _block()
    path = tmp_path / "last_state.safetensors"
    save_training_state(path, block, torch.optim.SGD(block.parameters(), lr=0.1), None, None, None, 0, 0, 0)
    with pytest.raises(ValueError, match="format 'repmlp-training-state-1' .*resume it with --resume"):
        repmlp.load_checkpoint(_block(), path)


def test_a_state_dict_in_the_overlay_keeps_its_trained_head_and_converts():
    """``pretrained_cfg_overlay=dict(state_dict=...)`` goes through our loader as a file does: a 3-class state loads
    with ``num_classes=3`` although the registry says 10 (timm's loader would drop the head), into the deploy form
    too, and without ``num_classes`` it is an error naming the argument."""
    trained = randomize_bn_stats(timm.create_model("repmlp_cifar_mlp", **TINY_CIFAR, num_classes=3)).eval()
    overlay = dict(state_dict=trained.state_dict())
    x, args = torch.randn(2, 3, 32, 32), dict(pretrained=True, pretrained_cfg_overlay=overlay, **TINY_CIFAR)
    for deploy in (False, True):
        loaded = timm.create_model("repmlp_cifar_mlp", **args, num_classes=3, deploy=deploy).eval()
        assert repmlp.is_deploy_form(loaded) == deploy and loaded.pretrained_cfg.get("file") is None
        with torch.no_grad():
            assert rel_err(trained(x), loaded(x)) < 1e-5
    with pytest.raises(ValueError, match="pretrained_cfg_overlay holds a classifier for 3 classes.* num_classes=3"):
        timm.create_model("repmlp_cifar_mlp", **args)
