"""timm's model contract for every registered model: feature extraction (forward_intermediates, features_only
with every feature_cls, FX), TorchScript, head semantics, pretrained_cfgs; shipped folders loaded as timm loads
folders, from a clone and from an installed wheel; a segmentation-models-pytorch client."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import rel_err
from torchvision.models.feature_extraction import create_feature_extractor

import repmlp
from repmlp.models import model_input_size
from repmlp.shipped import ENV_VAR, WEIGHTS_NAME, read_config, sha256, shipped_models, weights_dir

ROOT = Path(__file__).resolve().parents[1]
MODELS = timm.list_models("repmlp*")
FEATURE_CLASSES = ["list", "dict", "hook", "fx", "getter"]

# Small sizes per family (the preset's layout, few channels): RepMLPNet is built for 32x32 and run at 64x64 in
# places, so its blocks see 2x2 partitions as a preset at twice its size does.
SMALL = {
    "repmlp_res50": dict(img_size=64, partition=4, widths=(64, 128, 256, 512)),
    "repmlpnet": dict(
        img_size=32, partitions=(8, 4, 2, 1), channels=(8, 16, 16, 32), sharesets=(1, 2, 4, 8), depths=(1, 1, 2, 1)
    ),
    "repmlp_cifar_mlp": dict(img_size=16, partition=4, widths=(8, 16, 16)),
    "repmlp_cifar_wideconv": dict(widths=(8, 16, 16)),
    "repmlp_fmnist": dict(),
}


def small_kwargs(name: str) -> dict:
    return next(v for k, v in SMALL.items() if name.startswith(k))


def create(name: str, seed: int = 0, randomize_bn: bool = True, **kwargs) -> torch.nn.Module:
    """A small model of ``name`` with seeded weights and (by default) randomised BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **{**small_kwargs(name), **kwargs})
    return (repmlp.randomize_bn_stats(model, seed) if randomize_bn else model).eval()


def inputs(model: torch.nn.Module, batch: int = 2, scale: int = 1) -> torch.Tensor:
    c, h, w = model_input_size(model)
    return torch.randn(batch, c, h * scale, w * scale, generator=torch.Generator().manual_seed(1))


def assert_equal_lists(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape and torch.equal(e, a)


# ------------------------------------------------------------------------------------------ feature extraction


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_follow_timm_semantics(name):
    model = create(name)
    x = inputs(model)
    levels = len(model.feature_info)
    assert levels >= 3
    with torch.no_grad():
        features = model.forward_features(x)
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, features) and torch.equal(intermediates[-1], features)
        assert [t.shape[1] for t in intermediates] == [f["num_chs"] for f in model.feature_info]
        assert [x.shape[-1] // t.shape[-1] for t in intermediates] == [f["reduction"] for f in model.feature_info]
        assert_equal_lists(intermediates[-2:], model.forward_intermediates(x, indices=2, intermediates_only=True))
        picked = model.forward_intermediates(x, indices=[0, -1], stop_early=True, intermediates_only=True)
        assert_equal_lists([intermediates[0], intermediates[-1]], picked)
        early, first = model.forward_intermediates(x, indices=[0], stop_early=True)
        assert_equal_lists(intermediates[:1], first) and torch.equal(early, intermediates[0])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", MODELS)
def test_prune_intermediate_layers_keeps_the_requested_levels(name):
    model = create(name)
    x = inputs(model)
    with torch.no_grad():
        intermediates = model.forward_intermediates(x, intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 1])
        assert kept == [0, 1] and model.num_classes == 0
        assert model.num_features == model.feature_info[1]["num_chs"]
        assert_equal_lists(intermediates[:2], model.forward_intermediates(x, indices=[0, 1], intermediates_only=True))
        assert torch.equal(model(x), intermediates[1])  # the head passes the features through


@pytest.mark.parametrize("name", MODELS)
def test_features_only_with_every_feature_cls(name):
    reference = create(name, randomize_bn=False)  # seeded init: the same weights whatever the module order
    x = inputs(reference)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
    for feature_cls in FEATURE_CLASSES:
        extractor = create(name, randomize_bn=False, features_only=True, feature_cls=feature_cls)
        assert extractor.feature_info.channels() == [f["num_chs"] for f in reference.feature_info], feature_cls
        with torch.no_grad():
            out = extractor(x)
        assert_equal_lists(expected, list(out.values()) if isinstance(out, dict) else out)


@pytest.mark.parametrize("name", MODELS)
def test_fx_feature_extraction_keeps_the_input_checks(name):
    model = create(name)
    x = inputs(model)
    nodes = [f["module"] for f in model.feature_info] + ["head"]
    extractor = create_feature_extractor(model, nodes)  # torchvision's, no timm tracer settings
    with torch.no_grad():
        out = extractor(x)
        expected = model.forward_intermediates(x, intermediates_only=True) + [model(x)]
        assert_equal_lists(expected, list(out.values()))
    c, h, w = model_input_size(model)
    if not model.pretrained_cfg["fixed_input_size"]:  # any size runs; the channel check stays in the graph
        with pytest.raises(ValueError, match=rf"\(N, {c}, "):
            extractor(torch.randn(1, c + 1, h, w))
        return
    with pytest.raises(ValueError, match=rf"{h}.*{h + 4}|{h + 4}.*{h}"):  # eager, in the graph: both sizes
        extractor(torch.randn(1, c, h + 4, w + 4))


@pytest.mark.parametrize("name", ["repmlp_fmnist_mlp", "repmlpnet_t224", "repmlp_res50_bottleneck_224"])  # families
def test_fx_graphs_script(name):
    model = create(name)
    x = inputs(model)
    extractor = create_feature_extractor(model, [f["module"] for f in model.feature_info])
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        assert_equal_lists(expected, list(torch.jit.script(extractor)(x).values()))


# ------------------------------------------------------------------------------------------ TorchScript


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_train_and_deploy_forms(name):
    train = create(name)
    deploy = repmlp.convert_to_deploy(train)
    scale = 2 if name.startswith("repmlpnet") else 1  # RepMLPNet also at 2x2 partitions per block
    x = inputs(train, scale=scale)
    with torch.no_grad():
        scripted_deploy = torch.jit.script(deploy)
        y_train, y_deploy = torch.jit.script(train)(x), scripted_deploy(x)
        assert torch.equal(y_train, train(x)) and torch.equal(y_deploy, deploy(x))
        assert rel_err(y_train, y_deploy) <= 1e-5
    c, h, w = model_input_size(train)
    if train.pretrained_cfg["fixed_input_size"]:  # the others take any size
        with pytest.raises(torch.jit.Error, match="ValueError"):
            scripted_deploy(torch.randn(1, c, h + 4, w + 4))


@pytest.mark.parametrize("name", MODELS)
def test_wrong_input_size_is_a_value_error_naming_both_sizes(name):
    """Models with RepMLP v1 blocks accept the sizes of their partition grids; RepMLPNet and the Wide ConvNet any."""
    model = create(name)
    c, h, w = model_input_size(model)
    x = torch.randn(1, c, h + 4, w + 4)
    if not model.pretrained_cfg["fixed_input_size"]:
        assert model(x).shape == (1, model.num_classes)
        return
    with pytest.raises(ValueError, match=rf"{h}.*{h + 4}|{h + 4}.*{h}"):
        model(x)


# ------------------------------------------------------------------------------------------ head


@pytest.mark.parametrize("name", MODELS)
def test_head_semantics(name):
    model = create(name)
    x = inputs(model)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.head_hidden_size) and model(x).shape == (2, model.num_classes)
        assert model.get_classifier() is model.head.fc
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0)
        assert torch.equal(model(x), pooled)
        model.reset_classifier(3, global_pool="max")
        assert model(x).shape == (2, 3)
        model.reset_classifier(0, global_pool="")  # no pooling: timm's unpooled map of the head's features
        unpooled = model.forward_head(features, pre_logits=True)
        assert unpooled.shape == (2, model.head_hidden_size, *features.shape[-2:])


def test_mlp_head_without_pooling_classifies_every_position():
    model = create("repmlp_fmnist_mlp", global_pool="")
    with torch.no_grad():
        features = model.forward_features(inputs(model))
        maps, logits = model.forward_head(features, pre_logits=True), model.forward_head(features)
    assert maps.shape == (2, 512, 7, 7) and logits.shape == (2, 10, 7, 7)
    per_position = model.head.fc(maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.equal(logits, per_position)
    with pytest.raises(ValueError, match="catavgmax"):
        create("repmlp_fmnist_mlp", global_pool="catavgmax")


# ------------------------------------------------------------------------------------------ pretrained cfgs


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfgs_are_complete(name):
    for cfg in timm.models.get_arch_pretrained_cfgs(name).values():
        cfg = cfg.to_dict()
        assert {"paper_name", "paper_ids", "origin_url", "description", "license"} <= set(cfg)
        if cfg.get("file"):
            assert not Path(cfg["file"]).is_absolute() and (weights_dir() / cfg["file"]).is_dir()
            assert len(cfg["label_names"]) == cfg["num_classes"] and cfg.get("notes")


def test_fashion_mnist_labels():
    cfg = timm.models.get_pretrained_cfg("repmlp_fmnist_mlp.fmnist").to_dict()
    assert cfg["label_names"][0] == "T-shirt/top" and cfg["label_names"][9] == "Ankle boot"


# ------------------------------------------------------------------------------------------ shipped folders

SHIPPED = sorted({e["folder"] for e in shipped_models()})


def test_every_shipped_model_is_a_folder():
    assert SHIPPED == ["repmlp_fmnist_mlp.fmnist"]


@pytest.mark.parametrize("folder", SHIPPED)
def test_shipped_folder_matches_the_registry(folder):
    path = weights_dir() / folder
    config = read_config(path)
    name = f"{config['architecture']}.{config['pretrained_cfg']['tag']}"
    registry = timm.models.get_pretrained_cfg(name).to_dict()
    assert registry["file"] == folder
    expected = {k: v for k, v in registry.items() if k not in ("file", "architecture", "source")}
    assert json.loads(json.dumps(expected)) == config["pretrained_cfg"]  # tuples as JSON lists
    assert config["num_classes"] == registry["num_classes"]
    assert set(config["files"]) == {WEIGHTS_NAME} and config["files"][WEIGHTS_NAME]["form"] == "train"
    assert sha256(path / WEIGHTS_NAME) == config["files"][WEIGHTS_NAME]["sha256"]
    card = (path / "README.md").read_text()
    assert all(word in card for word in ("Fashion-MNIST", "tools/train.py", "tools/eval.py", "deploy", "MIT"))


@pytest.mark.parametrize("folder", SHIPPED)
def test_local_dir_loads_the_shipped_folder_in_both_forms(folder):
    name = f"{read_config(weights_dir() / folder)['architecture']}.{folder.split('.', 1)[1]}"
    by_name = timm.create_model(name, pretrained=True).eval()
    train = timm.create_model(f"local-dir:{weights_dir() / folder}", pretrained=True).eval()
    deploy = timm.create_model(f"local-dir:{weights_dir() / folder}", pretrained=True, deploy=True).eval()
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), train.state_dict().values()))
    assert list(train.pretrained_cfg["label_names"]) == list(by_name.pretrained_cfg["label_names"])
    assert repmlp.is_deploy_form(deploy)
    report = repmlp.verify_equivalence(train, deploy, batch_size=4)
    assert report.passed and report.argmax_agreement == 1.0, str(report)


@pytest.mark.parametrize("folder", SHIPPED)
def test_tools_read_a_model_folder_as_its_weights_file(folder):
    from repmlp.sources import model_from_checkpoint, recorded_model_args

    name, kwargs, _ = recorded_model_args(weights_dir() / folder)
    assert (name, kwargs["num_classes"]) == (read_config(weights_dir() / folder)["architecture"], 10)
    assert not repmlp.is_deploy_form(model_from_checkpoint(weights_dir() / folder))  # a train-form file, by structure


def test_a_corrupted_shipped_file_is_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "repmlp_fmnist_mlp.fmnist"
    shutil.copytree(weights_dir() / "repmlp_fmnist_mlp.fmnist", folder)
    weights = folder / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in a tensor: still a readable safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}.*sha256"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # the registered name, from a corrupted weights directory
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}.*sha256"):
        timm.create_model("repmlp_fmnist_mlp.fmnist", pretrained=True)


def _source_files() -> list[str]:
    """The repository's files as a clone has them (tracked or not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


_WHEEL_CHECK = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import safetensors.torch, timm, torch
import repmlp
root = Path(sys.argv[2]).resolve()
assert Path(repmlp.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), repmlp.__file__
assert not any(Path(p).resolve() == root for p in sys.path if p), sys.path
model = timm.create_model("repmlp_fmnist_mlp.fmnist", pretrained=True)
safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[3])
print(json.dumps({"module": repmlp.__file__, "weights": str(repmlp.shipped.weights_dir())}))
"""


def test_wheel_carries_the_shipped_weights(tmp_path):
    src = tmp_path / "src"
    for name in _source_files():  # build from a copy: setuptools writes build/ into the tree it builds
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    offline = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []  # else as pip install did
    subprocess.run(
        pip + ["wheel", "--no-deps", *offline, "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True
    )
    wheel = next((tmp_path / "dist").glob("repmlp-*.whl"))
    site = tmp_path / "site"
    subprocess.run(
        pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True, capture_output=True
    )
    loaded = tmp_path / "loaded.safetensors"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", ENV_VAR)} | {"HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-I", "-c", _WHEEL_CHECK, str(site), str(ROOT), str(loaded)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    where = json.loads(run.stdout.splitlines()[-1])
    assert Path(where["weights"]).is_relative_to(site)
    # the tensors the installed copy loaded, compared with ours bit for bit (logits could differ in the last bit
    # between processes with other thread counts)
    ours = timm.create_model("repmlp_fmnist_mlp.fmnist", pretrained=True).state_dict()
    theirs = safetensors.torch.load_file(loaded)
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


# ------------------------------------------------------------------------------------------ dense prediction


@pytest.mark.parametrize(
    "encoder,kwargs,size",
    [
        ("tu-repmlpnet_t224", SMALL["repmlpnet"], 64),  # built for 32x32, run at 64x64 (as T224 at 448x448)
        ("tu-repmlp_res50_light_224", SMALL["repmlp_res50"], 64),
    ],
)
def test_segmentation_models_pytorch_unet_trains_and_converts_exactly(encoder, kwargs, size):
    import segmentation_models_pytorch as smp  # the dev extra installs it

    torch.manual_seed(0)
    unet = smp.Unet(encoder, encoder_weights=None, classes=3, decoder_channels=(32, 16, 16, 8, 8), **kwargs)
    repmlp.randomize_bn_stats(unet)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    unet.train()
    out = unet(x)
    assert out.shape == (2, 3, size, size)
    out.square().mean().backward()
    grads = [p.grad for n, p in unet.encoder.named_parameters() if "fc3" in n]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)
    deploy = repmlp.convert_to_deploy(unet)
    assert repmlp.is_deploy_form(deploy.encoder)
    for report in (
        repmlp.verify_equivalence(unet, deploy, inputs=x),
        repmlp.verify_conversion(unet, torch.float64, inputs=x),
    ):
        assert report.passed, str(report)
