"""mmpretrain's RepMLPNet files (tests/fixtures/mmpretrain/, made by mmpretrain 1.2.0's own code): both of its forms
load through our one loading path and reproduce its logits; its full-size B224/B256 layouts map onto our models;
the two timm tags for its ImageNet releases load offline from torch.hub's cache; near-miss files of every layout
get one clear error naming the closest layout."""

import json
import shutil
from pathlib import Path

import onnxruntime
import pytest
import timm
import torch
from conftest import REFERENCE, load_tool, rel_err
from safetensors.torch import load_file
from test_repmlpnet import TINY as AUTHORS_TINY  # the authors' tiny RepMLPNet as our arguments
from timm.data import create_transform, resolve_data_config

import repmlp
from repmlp.authors import keys_to_ours
from repmlp.models.repmlpnet import RepMLPBlock
from repmlp.training import build_eval_data, load_config

MMPRETRAIN = Path(__file__).resolve().parent / "fixtures" / "mmpretrain"
CONFIG = json.loads((MMPRETRAIN / "tiny_config.json").read_text())["ours"]
#: our constructor arguments of mmpretrain's tiny classifier (tiny_config.json), for any RepMLPNet preset name
TINY = dict(
    img_size=CONFIG["img_size"],
    partitions=tuple(CONFIG["img_size"] // 4 // 2**i for i in range(4)),  # one partition per stage, as mmpretrain's
    channels=CONFIG["channels"],
    depths=CONFIG["depths"],
    sharesets=CONFIG["sharesets"],
    reparam_conv_k=CONFIG["reparam_conv_k"],
    gp_reduction=CONFIG["gp_reduction"],
    num_classes=CONFIG["num_classes"],
)
IO = load_file(MMPRETRAIN / "tiny_io.safetensors")


def mmpretrain_file(form: str) -> dict:
    """mmpretrain's checkpoint as it is: {'meta': ..., 'state_dict': ...}."""
    return torch.load(MMPRETRAIN / f"tiny_{form}.pth", weights_only=True)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IO["input"])


# the shapes a file of theirs comes in: as mmpretrain saves it, a bare state dict (deploy files before Dec 2022),
# and a DistributedDataParallel 'module.' prefix
WRAPPINGS = {
    "meta_state_dict": lambda ckpt: ckpt,
    "bare": lambda ckpt: ckpt["state_dict"],
    "module_prefix": lambda ckpt: {"state_dict": {f"module.{k}": v for k, v in ckpt["state_dict"].items()}},
}


def _load(route: str, path: Path, deploy: bool) -> torch.nn.Module:
    if route == "load_checkpoint":
        return repmlp.load_checkpoint(timm.create_model("repmlpnet_b224", deploy=deploy, **TINY), path)
    if route == "create_model":
        overlay = dict(file=str(path))
        return timm.create_model(
            "repmlpnet_b224", pretrained=True, deploy=deploy, pretrained_cfg_overlay=overlay, **TINY
        )
    model = timm.create_model("repmlpnet_b224", deploy=deploy, **TINY)  # timm's own loader with our filter
    timm.models.load_checkpoint(model, str(path), filter_fn=repmlp.checkpoint_filter_fn)
    return model


@pytest.mark.parametrize("file_form", ["train", "deploy"])
def test_their_files_reproduce_their_logits(tmp_path, file_form):
    """Their train form loads into our train and deploy forms, their deploy form into our deploy form (and is refused
    by our train form), through every route and in every shape their files come in; each reproduces mmpretrain's
    logits of that file."""
    expected = IO[f"logits_{file_form}"]
    path = MMPRETRAIN / f"tiny_{file_form}.pth"
    for route in ("load_checkpoint", "create_model", "timm_load_checkpoint"):
        for deploy in (False, True):
            if file_form == "deploy" and not deploy:
                with pytest.raises(ValueError, match="deploy-form .* cannot be recovered"):
                    _load(route, path, deploy)
                continue
            model = _load(route, path, deploy)
            assert repmlp.is_deploy_form(model) == deploy
            assert rel_err(expected, logits(model)) <= 1e-5, (route, deploy)
    for wrapping, wrap in WRAPPINGS.items():
        torch.save(wrap(mmpretrain_file(file_form)), tmp_path / f"{wrapping}.pth")
        model = _load("load_checkpoint", tmp_path / f"{wrapping}.pth", deploy=True)
        assert rel_err(expected, logits(model)) <= 1e-5, wrapping


def test_their_train_file_converts_exactly(tmp_path):
    """Our deploy form of their train form: the float64 conversion check and float32 equivalence with randomised
    BN statistics (theirs are randomised already)."""
    train = repmlp.load_checkpoint(timm.create_model("repmlpnet_b224", **TINY), MMPRETRAIN / "tiny_train.pth").eval()
    assert repmlp.verify_conversion(train, batch_size=1).max_rel_err <= 1e-10
    report = repmlp.verify_equivalence(train, repmlp.convert_to_deploy(train), inputs=IO["input"])
    assert report.passed and report.max_rel_err <= 1e-5, str(report)


@pytest.mark.parametrize("size", [224, 256])
@pytest.mark.parametrize("file_form", ["train", "deploy"])
def test_full_size_layouts_map_onto_our_models(size, file_form):
    """Every key and shape of their B224/B256 listings lands on our repmlpnet_b224/b256 (their deploy form on our
    train form with each RepMLP Block locality-injected), built on the meta device: no download, no memory."""
    state = {}
    for line in (MMPRETRAIN / f"keys_mmpretrain_B{size}_{file_form}.txt").read_text().splitlines():
        key, shape = line.rsplit(" (", 1)
        state[key] = torch.empty([int(s) for s in shape.rstrip(")").split(",") if s.strip()], device="meta")
    with torch.device("meta"):
        model = timm.create_model(f"repmlpnet_b{size}")
        if file_form == "deploy":
            for block in [m for m in model.modules() if isinstance(m, RepMLPBlock)]:
                block.reparameterize()
    ours = keys_to_ours(state, model, model.key_layouts)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ pretrained tags

TAGS = {
    "repmlpnet_b224.mmpretrain_in1k": ("repmlp-base_3rdparty_8xb64_in1k_20220330-1cb1f11b.pth", (256, 256), 224),
    "repmlpnet_b256.mmpretrain_in1k": ("repmlp-base_3rdparty_8xb64_in1k-256px_20220330-7c5a91ce.pth", 292, 256),
}


def test_the_tags_are_listed():
    assert timm.list_pretrained("repmlpnet_b2*") == sorted(TAGS)
    assert timm.list_pretrained("repmlpnet*") == sorted(TAGS)  # no other RepMLPNet weights claim a download


@pytest.mark.parametrize("tag", TAGS)
def test_tag_cfg(tag):
    """mmpretrain's url, the eval transform behind its published accuracy (timm's and our tools'), licence, origin
    and the note that the accuracy was not measured here."""
    file, resize, crop = TAGS[tag]
    cfg = timm.models.get_pretrained_cfg(tag).to_dict()
    assert cfg["url"] == f"https://download.openmmlab.com/mmclassification/v0/repmlp/{file}"
    with torch.device("meta"):
        model = timm.create_model(tag)
    data = ["data.dataset=synthetic", "data.synthetic={num_samples: 1}", "data.num_workers=0"]
    tools = build_eval_data(load_config(None, data), model).dataset
    for transform in create_transform(**resolve_data_config(pretrained_cfg=cfg)), tools.transform:  # timm's, ours
        resize_op, crop_op = transform.transforms[:2]
        assert (resize_op.size, resize_op.interpolation.value, crop_op.size) == (resize, "bilinear", (crop, crop))
    assert cfg["license"] == "apache-2.0" and "mmpretrain" in cfg["origin_url"]
    assert any("not measured here" in note for note in cfg["notes"])
    assert any("github.com/DingXiaoH/RepMLP" in note for note in cfg["notes"])


def _no_download(*args, **kwargs):
    raise AssertionError("tried to download")


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("file_form", ["train", "deploy"])
def test_tag_loads_from_the_torch_hub_cache(tmp_path, monkeypatch, tag, file_form):
    """``create_model(tag, pretrained=True)`` reads the file timm's download would leave at
    ``$TORCH_HOME/hub/checkpoints/<file name>`` (here mmpretrain's tiny file under the release's name, with the
    tiny architecture's arguments), in either of our forms, without the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(timm.models._hub, "download_url_to_file", _no_download)
    cached = tmp_path / "hub" / "checkpoints" / TAGS[tag][0]
    cached.parent.mkdir(parents=True)
    shutil.copy(MMPRETRAIN / f"tiny_{file_form}.pth", cached)
    for deploy in (True, False) if file_form == "train" else (True,):
        model = timm.create_model(tag, pretrained=True, deploy=deploy, **TINY)
        assert rel_err(IO[f"logits_{file_form}"], logits(model)) <= 1e-5
        assert model.pretrained_cfg["tag"] == tag.split(".")[1]


# ------------------------------------------------------------------------------------------ tools


def test_tools_take_their_files(tmp_path, capsys):
    """tools/export_onnx.py --weights writes from their deploy-form file (its form judged by structure) an ONNX file
    that reproduces mmpretrain's logits; tools/eval.py --weights evaluates their train-form file as our deploy form
    (on synthetic images at the tiny model's size: there is no ImageNet here)."""
    weights = str(MMPRETRAIN / "tiny_deploy.pth")
    output = tmp_path / "tiny.onnx"
    argv = [
        "--weights",
        weights,
        "--model",
        "repmlpnet_b224",
        "--model-kwargs",
        json.dumps(TINY),
        "--output",
        str(output),
    ]
    assert load_tool("export_onnx").main(argv) == 0
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = torch.cat([torch.from_numpy(session.run(None, {name: x[None].numpy()})[0]) for x in IO["input"]])
    assert rel_err(IO["logits_deploy"], got) <= 1e-5
    capsys.readouterr()
    config = tmp_path / "data.yaml"
    config.write_text(f"data:\n  input_size: [3, {TINY['img_size']}, {TINY['img_size']}]\n")
    weights = str(MMPRETRAIN / "tiny_train.pth")
    argv = ["--weights", weights, "--model", "repmlpnet_b224", "--model-kwargs", json.dumps(TINY), "--form", "deploy"]
    argv += ["--config", str(config), "--dataset", "synthetic", "--batch-size", "64", "--workers", "0", "--no-progress"]
    assert load_tool("eval").main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["form"] == "deploy" and result["checkpoint"] == weights and 0 <= result["top1"] <= 100


# ------------------------------------------------------------------------------------------ near misses


class _NotAPlainContainer:
    pass


def test_a_file_that_needs_unpickling_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"meta": {"config": _NotAPlainContainer()}, "state_dict": mmpretrain_file("train")["state_dict"]}, path)
    with pytest.raises(
        ValueError,
        match=r"cannot read weights file .*: it holds a .*_NotAPlainContainer object .* not unpickled .*torch\.save",
    ):
        repmlp.load_checkpoint(timm.create_model("repmlpnet_b224", **TINY), path)


def _without(state: dict, key: str) -> dict:
    assert key in state
    return {k: v for k, v in state.items() if k != key}


def _renamed(state: dict, old: str, new: str) -> dict:
    assert old in state
    return {(new if k == old else k): v for k, v in state.items()}


def _ours(deploy: bool) -> dict:
    model = timm.create_model("repmlpnet_b224", **TINY)
    return (repmlp.convert_to_deploy(model) if deploy else model).state_dict()


def _authors(form: str) -> dict:
    return load_file(REFERENCE / f"repmlpnet_tiny_{form}.safetensors")


LAYOUTS = "ours, the authors' RepMLPNet, mmpretrain's RepMLPNet"

# (file, model arguments, closest layout, what the message names)
NEAR_MISSES = {
    "mmpretrain_train_missing_a_key": (
        lambda: _without(mmpretrain_file("train")["state_dict"], "backbone.stages.1.0.repmlp_block.repconv3.bn.bias"),
        TINY,
        "mmpretrain's RepMLPNet",
        "missing keys [stages.1.blocks.0.repmlp.local_perceptron.branches.1.bn.bias]",
    ),
    "mmpretrain_deploy_marker_renamed": (
        lambda: _renamed(
            mmpretrain_file("deploy")["state_dict"],
            "backbone.patch_embed.projection.weight",
            "backbone.patch_embed.proj.weight",
        ),
        dict(TINY, deploy=True),
        "mmpretrain's RepMLPNet",
        "missing keys [stem.conv.weight], unexpected keys [backbone.patch_embed.proj.weight]",
    ),
    "mmpretrain_deploy_other_sharesets": (
        lambda: mmpretrain_file("deploy")["state_dict"],
        dict(TINY, sharesets=(1, 2, 4, 4), deploy=True),
        "mmpretrain's RepMLPNet",
        "shape mismatches [stages.3.blocks.0.repmlp.channel_perceptron.fc3.weight: file (8, 4, 4) vs model (4, 4, 4)",
    ),
    "authors_train_extra_key": (
        lambda: {**_authors("train"), "stages.0.0.repmlp_block.fc4.weight": torch.zeros(1)},
        AUTHORS_TINY,
        "the authors' RepMLPNet",
        "missing keys [], unexpected keys [stages.0.blocks.0.repmlp_block.fc4.weight]",
    ),
    "ours_deploy_missing_a_key": (
        lambda: _without(_ours(deploy=True), "stages.1.downsample.conv.bias"),
        dict(TINY, deploy=True),
        "ours",
        "missing keys [stages.1.downsample.conv.bias], unexpected keys []",
    ),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_near_misses_name_the_closest_layout(tmp_path, case):
    """A file that is almost one of the layouts: one error naming the layouts tried, the closest and its first
    mismatching keys, never a parse or reshape error from inside."""
    make, kwargs, closest, mismatch = NEAR_MISSES[case]
    path = tmp_path / "weights.pth"
    torch.save(make(), path)
    with pytest.raises(ValueError) as err:
        repmlp.load_checkpoint(timm.create_model("repmlpnet_b224", **kwargs), path)
    message = str(err.value)
    assert f"the file read as {closest}, the closest of the layouts tried: {LAYOUTS})" in message
    assert mismatch in message and "does not match the model" in message


def test_authors_resnet_near_miss():
    """The RepMLP-ResNet family tries ours and the authors' v1 layout: their full-size file (zeros) with one key
    renamed, offered to a model on the meta device (the error builds its comparisons there too)."""
    state = {}
    for line in (REFERENCE / "keys_RepMLP-Res50-bottleneck-224_train.txt").read_text().splitlines():
        key, shape = line.split("\t")
        state[key] = torch.zeros([int(s) for s in shape.strip("[]").split(",") if s.strip()])
    state = _renamed(state, "stage2.1.btnk_conv1.bn.bias", "stage2.1.btnk_conv1.bn.b")
    with torch.device("meta"):
        model = timm.create_model("repmlp_res50_bottleneck_224")
    with pytest.raises(ValueError) as err, torch.device("meta"):
        repmlp.checkpoint.prepare_state_dict(state, model)
    message = str(err.value)
    assert "missing keys [stages.1.1.conv1.bn.bias], unexpected keys [stages.1.1.conv1.bn.b]" in message
    assert (
        "read as the authors' RepMLP-ResNet (paper v1), the closest of the layouts tried: ours, the authors'" in message
    )
