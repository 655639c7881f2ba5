import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "official"  # the authors' outputs, as data
TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def rel_err(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Max relative error per element: max |ref - cand| / max |ref|."""
    ref, cand = reference.double(), candidate.double()
    return ((ref - cand).abs().max() / ref.abs().max()).item()


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def official_state_dict(keys_file, seed=0):
    """A state dict with exactly the authors' keys and shapes, random values (positive variances)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for line in (REFERENCE / keys_file).read_text().splitlines():
        key, shape = line.split("\t")
        shape = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
        value = torch.rand(shape, generator=gen) * 0.1
        state[key] = value + 0.5 if key.endswith("running_var") else value
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
    return state


def load_tool(name):
    """A script of tools/ as a module, to call its ``main(argv)`` in-process."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
