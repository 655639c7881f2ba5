import importlib.util
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# inductor compiles in this process instead of starting a pool of compile workers, each importing torch again (seconds
# of CPU per pytest-xdist worker on two cores, for the few small graphs the suite compiles); the same generated code
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import repmlp  # noqa: E402
from repmlp.data import FASHION_MNIST_ROOT  # noqa: E402
from repmlp.models import model_input_size  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "official"  # the authors' outputs, as data
TOOLS = Path(__file__).resolve().parents[1] / "tools"


# pytest-xdist workers and the tests' subprocesses (started after this) keep freed memory for reuse instead of
# handing every large block back to the kernel and faulting it in again on the next allocation: page faults are a
# large share of this suite's time (full-size models, checkpoint files). Memory settings only, no effect on results.
for _name, _value in (
    ("MALLOC_MMAP_THRESHOLD_", 1 << 32),
    ("MALLOC_TRIM_THRESHOLD_", 1 << 32),
    ("MALLOC_TOP_PAD_", 1 << 30),
):
    os.environ.setdefault(_name, str(_value))

# pytest-xdist workers share the cores: each takes its share of torch's threads instead of all of them
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def rel_err(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Max relative error per element: max |ref - cand| / max |ref|."""
    ref, cand = reference.double(), candidate.double()
    return ((ref - cand).abs().max() / ref.abs().max()).item()


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# ------------------------------------------------------------------------------------- the zoo, per design

REGISTERED = timm.list_models("repmlp*")


def design(name: str) -> str:
    """The model family and block design of ``name``: presets that differ only in groups, size or width share one
    (repmlp_res50_light_224 and repmlp_res50_light_g4_224; repmlpnet_b224 and repmlpnet_l256)."""
    return re.sub(r"_([a-z]?\d+|g\d+(g\d+)*)(_\d+)?$", "", name)


#: One registered preset per design (the first by name): what a preset's numbers cannot change is tested on these.
DESIGNS = sorted({min(n for n in REGISTERED if design(n) == design(m)) for m in REGISTERED})

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
    """Constructor arguments that make ``name`` small and fast, keeping its block types and options."""
    return dict(next(v for k, v in SMALL.items() if name.startswith(k)))


def create(name: str, seed: int = 0, randomize_bn: bool = True, **kwargs) -> torch.nn.Module:
    """A small model of ``name`` with seeded weights and (by default) randomised BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **{**small_kwargs(name), **kwargs})
    return (repmlp.randomize_bn_stats(model, seed) if randomize_bn else model).eval()


#: The smallest model of the suite: repmlp_cifar_mlp with other widths and FC3 groups than its preset's.
TINY_CIFAR = dict(widths=(8, 16, 32), fc3_groups=4)

#: (name, constructor kwargs) of one small model per design, plus one built with non-default constructor arguments.
CASES = [pytest.param(n, small_kwargs(n), id=n) for n in DESIGNS] + [
    pytest.param("repmlp_cifar_mlp", {**small_kwargs("repmlp_cifar_mlp"), **TINY_CIFAR}, id="repmlp_cifar_mlp-widths")
]


def inputs(model: torch.nn.Module, batch: int = 2, scale: int = 1) -> torch.Tensor:
    """Seeded standard-normal inputs of the model's size (``scale`` times its height and width)."""
    c, h, w = model_input_size(model)
    return torch.randn(batch, c, h * scale, w * scale, generator=torch.Generator().manual_seed(1))


#: Tests that read the real Fashion-MNIST (Debian's package; CI installs it, a new user's machine may not have it).
needs_fashion_mnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT).is_dir(),
    reason="Fashion-MNIST not installed here: apt-get install -y dataset-fashion-mnist",
)


def official_state_dict(keys_file, seed=0):
    """A state dict with exactly the authors' keys and shapes, random values (positive variances)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for line in (REFERENCE / keys_file).read_text().splitlines():
        key, shape = line.split("\t")
        shape = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
        value = torch.rand(shape, generator=gen).mul_(0.1)  # in place: full-size layouts hold up to 97M values
        state[key] = value.add_(0.5) if key.endswith("running_var") else value
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
    return state


def load_tool(name):
    """A script of tools/ as a module, to call its ``main(argv)`` in-process (tools/ on the path, as for a script)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A tiny Fashion-MNIST-shaped model trained for one epoch on synthetic 28x28 images (4 steps): a run directory as
# tools/train.py leaves it, for the tests of what the tools do with the files of a run.
TINY_RUN = [
    "model.name=repmlp_fmnist_mlp",
    "model.kwargs={widths: [4, 8], head_hidden_size: 16}",
    "data.dataset=synthetic",
    "data.num_workers=0",
    "data.synthetic={num_samples: 32, num_classes: 4}",
    "data.train_transform={color_jitter: null}",
    "optimizer.lr=0.05",
    "train.epochs=1",
    "train.batch_size=8",
    "train.eval_batch_size=32",
    "train.threads=1",
    "train.progress=false",
]


def train_tiny(out_dir, *overrides, resume=False):
    """Train the tiny run into ``out_dir`` in this process (keeping the process's thread count)."""
    from repmlp.training import load_config, train

    threads = torch.get_num_threads()
    try:
        return train(load_config(None, [*TINY_RUN, *overrides, f"train.output_dir={out_dir}"]), resume=resume)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny run's output directory (treat as read-only: copy it to change it)."""
    out = tmp_path_factory.mktemp("tiny_run")
    assert train_tiny(out)["equivalence"]["passed"]
    return out
