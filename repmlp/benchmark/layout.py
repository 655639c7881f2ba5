"""Weight storage layout, measured: the zoo's models with 4-D weights stored channels_last (the layout they had
until the weights were made contiguous: NHWC models' kernels channels_last, an NCHWStage's contiguous) against the
same models with every weight contiguous, as they are now. Inputs and every activation layout are the same in both
(:func:`repmlp.layers.in_layout`), so what differs is only how oneDNN gets its kernels."""

from __future__ import annotations

import copy
import functools
import statistics
from collections.abc import Sequence

import torch
from torch import nn

from ..convert import convert_to_deploy
from ..models import load_model, model_input_size
from ..models._base import NCHWStage
from ..verify import ErrorStats, randomize_bn_stats
from .timing import machine_state, spread, timed_round


def channels_last_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its 4-D weights stored as before: channels_last in a channels_last model, contiguous
    in its NCHWStages."""
    model = copy.deepcopy(model)
    if getattr(model, "channels_last", False):
        model.to(memory_format=torch.channels_last)
        for stage in model.modules():
            if isinstance(stage, NCHWStage):
                stage.to(memory_format=torch.contiguous_format)
    return model


def compare_weight_layouts(
    names: Sequence[str], batch_sizes: Sequence[int] = (1, 8), rounds: int = 15, seed: int = 0
) -> list[dict]:
    """Per model, form (train, deploy) and batch size: medians of interleaved rounds (one call of each layout per
    round, order rotated) and the per-round ratio contiguous / channels_last, with its p25-p75."""
    rows = []
    for name in names:
        torch.manual_seed(seed)
        train = randomize_bn_stats(load_model(name), seed).eval()
        for form, contiguous in (("train", train), ("deploy", convert_to_deploy(train))):
            before = channels_last_weights(contiguous)
            moved = sum(not p.is_contiguous() for p in before.parameters())
            for bs in batch_sizes:
                x = torch.randn(bs, *model_input_size(contiguous), generator=torch.Generator().manual_seed(seed))
                with torch.inference_mode():
                    err = ErrorStats.of(before(x), contiguous(x)).max_rel_err
                    for _ in range(2):  # warm-up
                        before(x), contiguous(x)
                    calls = [functools.partial(before, x), functools.partial(contiguous, x)]
                    times = [timed_round(calls, r) for r in range(rounds)]
                ratio = spread([t[1][0] / t[0][0] for t in times])
                rows.append(
                    dict(
                        model=name,
                        form=form,
                        batch=bs,
                        moved_weights=moved,
                        channels_last_ms=statistics.median(t[0][0] for t in times) * 1e3,
                        contiguous_ms=statistics.median(t[1][0] for t in times) * 1e3,
                        ratio=ratio,
                        max_rel_err=err,
                    )
                )
    return rows


def format_layout_table(rows: list[dict]) -> str:
    """The rows as a markdown table, followed by the machine's state."""
    lines = [
        "| model | form | batch | kernels that differ | channels_last weights, ms | contiguous, ms | "
        "contiguous / channels_last per round (p25-p75) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["ratio"]
        lines.append(
            f"| {r['model']} | {r['form']} | {r['batch']} | {r['moved_weights']} | {r['channels_last_ms']:.1f} | "
            f"{r['contiguous_ms']:.1f} | {q['median']:.3f} ({q['p25']:.3f}-{q['p75']:.3f}, {q['rounds']} rounds) |"
        )
    return "\n".join(lines) + f"\n\nmachine: {machine_state()}"
