"""One training epoch and evaluation, rank-aware (metrics are summed over ranks)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.utils import accuracy, dispatch_clip_grad, unwrap_model
from torch import nn
from tqdm import tqdm

from ..data import SKIPPED_LABEL, epoch_batches
from ..verify import compare_predictors
from .distributed import DistEnv, all_reduce_sum, any_rank
from .state import set_rng_states

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for train.precision ('fp32' -> None)."""
    if precision not in AMP_DTYPES:
        raise ValueError(f"train.precision must be one of {sorted(AMP_DTYPES)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision='fp16' needs a GPU; on CPU use 'bf16' or 'fp32'")
    return AMP_DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def check_targets(y: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless every label of a (CPU) batch is a class of a model with ``num_classes`` outputs (torch's
    own error is an IndexError deep in the loss)."""
    if y.dtype.is_floating_point or not y.numel():
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"the data has label {high if high >= num_classes else low} but the model has {num_classes} classes "
            f"(0..{num_classes - 1}): the data has other classes than the model (another dataset or class count), "
            "or its labels are corrupt"
        )


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


@dataclass
class TrainStep:
    """What one optimisation step needs besides the batch."""

    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    scheduler: object | None = None  # a timm scheduler (step_update per optimizer step)
    mixup: Callable | None = None
    ema: nn.Module | None = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    clip_grad: float | None = None
    clip_mode: str = "norm"
    accum_steps: int = 1  # batches whose gradients are summed into one optimizer step (see train.global_batch)


@dataclass
class EpochResult:
    loss: float
    top1: float
    images: int
    seconds: float
    steps: int  # batches done in this epoch, counting those before a resume (a multiple of accum_steps)
    num_updates: int
    interrupted: bool


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    step: TrainStep,
    env: DistEnv,
    epoch: int,
    num_updates: int,
    start_step: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
    progress: bool = True,
    rng: dict | None = None,
    epoch_steps: int | None = None,
) -> EpochResult:
    """Train for the rest of one epoch (from batch ``start_step`` when resuming mid-epoch).

    Each optimizer step sums the gradients of ``step.accum_steps`` batches (each loss divided by that count, so
    the step is the one a batch that many times larger gives); ``epoch_steps`` batches (default: the loader's; a
    last, incomplete group is dropped) make the epoch. Stops early, on every rank together, after the optimizer
    step at which ``should_stop()`` turns true on any rank: a saved position is always a step boundary.
    ``rng`` (generator states saved at an interruption) is restored once the data iterator exists, since
    creating it draws a seed: with ``num_workers=0`` a run resumed mid-epoch then repeats the interrupted
    run's augmentations exactly.
    """
    model.train()
    accum = step.accum_steps
    total = (epoch_steps or len(loader)) // accum * accum
    loss_sum, correct, seen, steps = 0.0, 0.0, 0, start_step
    bar = tqdm(
        total=total,
        initial=start_step,
        desc=f"epoch {epoch + 1}",  # counted from 1, as every output of a run
        dynamic_ncols=True,
        disable=not (progress and env.is_main),
        mininterval=1.0,
    )
    start = time.perf_counter()
    interrupted = False
    batches = epoch_batches(loader, epoch, start_step)
    if rng is not None:
        set_rng_states(rng)
    step.optimizer.zero_grad(set_to_none=True)
    for x, y in batches:
        if steps >= total:
            break
        labels = y
        x, y = _to_device(x, y, env.device, step.channels_last)
        target = y
        if step.mixup is not None:
            x, target = step.mixup(x, y)
        ends_group = (steps + 1) % accum == 0
        # DDP reduces gradients on the group's last backward only
        no_sync = model.no_sync() if not ends_group and hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync:
            with autocast(env.device, step.amp_dtype):
                out = model(x)
                check_targets(labels, out.shape[-1])
                loss = step.loss_fn(out, target)
            _backward(loss / accum, step)
        steps += 1
        n = y.shape[0]
        loss_sum += loss.item() * n
        correct += (out.argmax(1) == y).sum().item()
        seen += n
        bar.update()
        if not ends_group:
            continue
        _optimizer_step(model, step)
        num_updates += 1
        if step.scheduler is not None:
            step.scheduler.step_update(num_updates=num_updates)
        if step.ema is not None:
            step.ema.update(unwrap_model(model), step=num_updates)
        elapsed = time.perf_counter() - start
        bar.set_postfix(
            loss=f"{loss_sum / seen:.4f}",
            acc=f"{100 * correct / seen:.2f}",
            img_s=f"{seen * env.world_size / elapsed:.0f}",
            lr=f"{step.optimizer.param_groups[0]['lr']:.2e}",
            refresh=False,
        )
        if any_rank(should_stop(), env):
            interrupted = True
            break
    bar.close()
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, float(seen)], env)
    seen = max(seen, 1.0)
    return EpochResult(loss_sum / seen, 100 * correct / seen, int(seen), seconds, steps, num_updates, interrupted)


def _backward(loss: torch.Tensor, step: TrainStep) -> None:
    (step.scaler.scale(loss) if step.scaler is not None else loss).backward()


def _optimizer_step(model: nn.Module, step: TrainStep) -> None:
    """Clip, step (through the AMP scaler, if any) and clear the gradients summed since the last step."""
    if step.scaler is not None:
        if step.clip_grad:
            step.scaler.unscale_(step.optimizer)
            dispatch_clip_grad(model.parameters(), step.clip_grad, mode=step.clip_mode)
        step.scaler.step(step.optimizer)
        step.scaler.update()
    else:
        if step.clip_grad:
            dispatch_clip_grad(model.parameters(), step.clip_grad, mode=step.clip_mode)
        step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    env: DistEnv,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (%) over the whole dataset (all ranks' shares), the images counted,
    and those left out because they could not be decoded (``skipped``: where the dataset skips bad images)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct1, correct5, seen, skipped = 0.0, 0.0, 0.0, 0, 0
    for x, y in tqdm(loader, desc="eval", dynamic_ncols=True, disable=not (progress and env.is_main), mininterval=1.0):
        keep = y != SKIPPED_LABEL
        if not bool(keep.all()):
            skipped += int((~keep).sum())
            x, y = x[keep], y[keep]
            if not len(y):
                continue
        labels = y
        x, y = _to_device(x, y, env.device, channels_last)
        with autocast(env.device, dtype):
            out = model(x)
        out = out.float()
        check_targets(labels, out.shape[1])
        k = min(5, out.shape[1])
        top1, top5 = accuracy(out, y, topk=(1, k))
        loss_sum += loss_fn(out, y).item()
        correct1 += top1.item() * y.shape[0] / 100
        correct5 += top5.item() * y.shape[0] / 100
        seen += y.shape[0]
    totals = all_reduce_sum([loss_sum, correct1, correct5, float(seen), float(skipped)], env)
    loss_sum, correct1, correct5, seen, skipped = totals
    count, seen = int(seen), max(seen, 1.0)
    metrics = {"loss": loss_sum / seen, "top1": 100 * correct1 / seen, "top5": 100 * correct5 / seen, "count": count}
    return {**metrics, "skipped": int(skipped)} if skipped else metrics


@torch.no_grad()
def compare_forms(
    train_form: nn.Module, deploy_form: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device
) -> dict[str, float]:
    """Run both forms over a whole dataset (one process, :func:`repmlp.verify.compare_predictors`): top-1 of each,
    argmax agreement and the largest per-element logit errors of the deploy form against the train form (NaN, with
    'nonfinite' saying where, when either form outputs a NaN or infinity)."""
    train_form.eval(), deploy_form.eval()
    check = compare_predictors(train_form, deploy_form, ((x.to(device), y) for x, y in loader))
    return {
        "argmax_agreement": check.argmax_agreement,
        "max_abs_err": check.max_abs_err,
        "max_rel_err": check.max_rel_err,
        "train_top1": check.reference_top1,
        "deploy_top1": check.candidate_top1,
        "count": check.count,
        **({"nonfinite": check.describe_nonfinite()} if check.nonfinite else {}),
    }
