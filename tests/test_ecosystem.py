"""The ecosystem's training paths on our models: what they rely on about ``state_dict()``."""

import pytest
import torch
from test_zoo import DESIGN_CASES, build
from timm.utils.model_ema import ModelEmaV2


@pytest.mark.parametrize("name,kwargs", DESIGN_CASES)
def test_timm_ema_updates_every_tensor(name, kwargs):
    """timm's ModelEmaV2 writes in place into ``state_dict()``'s tensors: they must alias the stored ones (a
    state-dict hook that hands out contiguous copies of channels_last weights would silently freeze them)."""
    model = build(name, kwargs)
    ema = ModelEmaV2(model, decay=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    stale = [
        k for (k, p), (_, q) in zip(model.named_parameters(), ema.module.named_parameters()) if not torch.equal(p, q)
    ]
    assert not stale
