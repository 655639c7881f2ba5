"""The other places users put a model: timm's EMA and scripts, accelerate, Lightning, torch.jit.trace, torch.export and
torch.hub, torch.compile, each with the real package, as a new user would call it (inductor on every family's deploy
form: test_runtime.py)."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import CASES, DESIGNS, TINY_CIFAR, create, inputs, rel_err
from test_repmlpnet import TINY
from timm.utils.model_ema import ModelEmaV2

import repmlp
from repmlp import timm_script
from repmlp.models import model_input_size

ROOT = Path(__file__).resolve().parents[1]


def _tiny():
    return timm.create_model("repmlp_cifar_mlp", **TINY_CIFAR)


def _loader(model, n=8, batch=4):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *model_input_size(model), generator=gen)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, model.num_classes, (n,), generator=gen))
    return torch.utils.data.DataLoader(data, batch_size=batch)


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name,kwargs", CASES)
def test_timm_ema_updates_every_tensor(name, kwargs):
    """timm's ModelEmaV2 writes in place into ``state_dict()``'s tensors: they must alias the stored ones (a
    state-dict hook that hands out contiguous copies of channels_last weights would silently freeze them)."""
    model = create(name, **kwargs)
    ema = ModelEmaV2(model, decay=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    stale = [
        k for (k, p), (_, q) in zip(model.named_parameters(), ema.module.named_parameters()) if not torch.equal(p, q)
    ]
    assert not stale


def test_accelerate_prepare_train_save_model_and_state(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer, loader = accelerator.prepare(model, optimizer, _loader(model))
    for x, y in loader:
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_model(model, tmp_path / "model")
    assert _same_weights(repmlp.load_checkpoint(_tiny(), tmp_path / "model"), model)  # its folder, as ours
    accelerator.save_state(tmp_path / "state")
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    accelerator.load_state(tmp_path / "state")
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    deploy = repmlp.load_checkpoint(
        timm.create_model("repmlp_cifar_mlp", deploy=True, **TINY_CIFAR), tmp_path / "model"
    )
    x = next(iter(loader))[0]
    assert rel_err(model.eval()(x), deploy.eval()(x)) <= 1e-5


def test_lightning_fit_checkpoint_resume_bf16_mixed(tmp_path):
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _tiny()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer_args = dict(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    first = Classifier()
    L.Trainer(max_steps=2, **trainer_args).fit(first, _loader(first.model))
    (checkpoint,) = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    resumed = Classifier()
    trainer = L.Trainer(max_steps=4, **trainer_args)
    trainer.fit(resumed, _loader(resumed.model), ckpt_path=checkpoint)
    assert trainer.global_step == 4 and all(p.dtype == torch.float32 for p in resumed.parameters())
    assert _same_weights(repmlp.load_checkpoint(_tiny(), checkpoint), first.model)  # 'model.' prefix stripped


# one case per design (not CASES' second repmlp_cifar_mlp: the same design, other constructor arguments, the same
# traced and exported ops), RepMLPNet at the authors' tiny size (tracing and exporting its blocks costs the most)
SMALLEST = [
    pytest.param(*c.values, id=c.id) if "repmlpnet" not in c.id else pytest.param(c.id, TINY, id=c.id)
    for c in CASES
    if c.id in DESIGNS
]


@pytest.mark.parametrize("name,kwargs", SMALLEST)
def test_jit_trace_and_torch_export_with_a_dynamic_batch(name, kwargs):
    """Deploy forms (what is shipped for inference), traced or exported at batch 2, run at batch 1 and 3."""
    deploy = repmlp.convert_to_deploy(create(name, **kwargs))
    x, others = inputs(deploy, 2), [inputs(deploy, 1), inputs(deploy, 3)]
    with pytest.warns(torch.jit.TracerWarning):  # the input checks are Python branches, fixed for the traced size
        traced = torch.jit.trace(deploy, x)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(deploy, (x,), dynamic_shapes=({0: batch},)).module()
    with torch.no_grad():
        for xb in others:
            assert rel_err(deploy(xb), traced(xb)) <= 1e-5 and rel_err(deploy(xb), exported(xb)) <= 1e-5


def test_the_train_form_traces_and_exports_too(tmp_path):
    """... and an exported program saved and loaded (``.pt2``) keeps its dynamic batch."""
    model = create("repmlp_cifar_mlp", **TINY_CIFAR)
    x, x3 = inputs(model, 2), inputs(model, 3)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(exported, tmp_path / "model.pt2")
    exported = torch.export.load(tmp_path / "model.pt2").module()
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(model, x)
    with torch.no_grad():
        assert rel_err(model(x3), exported(x3)) <= 1e-5 and rel_err(model(x3), traced(x3)) <= 1e-5


def test_torch_compile_of_a_training_step():
    """Dynamo captures the train form's forward and backward in one graph (BN in training mode, no graph break) and
    AOTAutograd's gradients are eager PyTorch's, on the smallest model. The aot_eager backend stops short of
    inductor's code generation, which takes minutes on two cores (inductor itself: test_runtime.py)."""
    model, reference = create("repmlp_fmnist_mlp").train(), create("repmlp_fmnist_mlp").train()
    x, y = inputs(model, 4), torch.tensor([0, 1, 2, 3])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(q.grad, p.grad) <= 1e-5, name


def test_torch_hub_local_entry_points_are_the_zoo():
    hub = torch.hub._import_module("hubconf", str(ROOT / "hubconf.py"))  # as torch.hub.load(source='local') does
    entry_points = sorted(f for f in dir(hub) if callable(getattr(hub, f)) and not f.startswith("_"))
    assert entry_points == sorted(timm.list_models("repmlp*"))
    assert "Pure-MLP" in hub.repmlp_fmnist_mlp.__doc__ and "fmnist" in hub.repmlp_fmnist_mlp.__doc__
    model = torch.hub.load(str(ROOT), "repmlp_fmnist_mlp", source="local", pretrained=True)
    assert _same_weights(model, timm.create_model("repmlp_fmnist_mlp.fmnist", pretrained=True))
    deploy = torch.hub.load(str(ROOT), "repmlp_cifar_mlp", source="local", deploy=True, num_classes=5, **TINY_CIFAR)
    assert deploy.deploy and deploy.num_classes == 5


# as timm's scripts (validate.py, inference.py, train.py of timm 1.0.31) build their model: argparse, then
# create_model(**resolve_model_input_args(...)); no `import repmlp` in it, as in timm's
TIMM_LIKE_SCRIPT = """
import argparse, json, sys
from timm.models import create_model, is_model, resolve_model_input_args
import helper  # a module beside the script: its folder is on sys.path, as for `python script.py`

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--pretrained", action="store_true")
parser.add_argument("--in-chans", type=int, default=None)
parser.add_argument("--input-size", type=int, nargs=3, default=None)
args = parser.parse_args()
assert is_model(args.model), args.model
model = create_model(**resolve_model_input_args(args.model, vars(args), pretrained=args.pretrained))
print(json.dumps(dict(name=__name__, argv0=sys.argv[0], in_chans=model.in_chans, tag=model.pretrained_cfg["tag"])))
"""


def test_timm_scripts_run_on_the_zoo_through_the_wrapper(tmp_path):
    """``python -m repmlp.timm_script SCRIPT ARGS`` registers the zoo, then runs the script as ``python SCRIPT``."""
    (tmp_path / "helper.py").write_text("")
    script = tmp_path / "validate.py"
    script.write_text(TIMM_LIKE_SCRIPT)
    command = [sys.executable, "-m", "repmlp.timm_script", str(script), "--model", "repmlp_fmnist_mlp.fmnist"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([*command, "--pretrained", "--in-chans", "1"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == dict(name="__main__", argv0=str(script), in_chans=1, tag="fmnist")
    without = subprocess.run(
        [sys.executable, str(script), "--model", "repmlp_fmnist_mlp"], capture_output=True, env=env
    )
    assert without.returncode != 0 and b"AssertionError: repmlp_fmnist_mlp" in without.stderr  # what the wrapper fixes


def test_timm_script_wrapper_names_what_is_missing(capsys):
    assert timm_script.main(["nowhere/validate.py"]) == 2
    assert "timm script not found: nowhere/validate.py" in capsys.readouterr().err
    assert timm_script.main([]) == 2 and "usage: python -m repmlp.timm_script" in capsys.readouterr().err
