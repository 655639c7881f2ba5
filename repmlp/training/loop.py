"""The training run: build everything from a config, train with checkpoints and metrics, then convert
to the deploy form, check it against the train form on the validation set and save both forms."""

from __future__ import annotations

__all__ = [
    "MIN_AGREEMENT",
    "RUN_FILES",
    "Run",
    "StopFlag",
    "accumulation_steps",
    "build_run",
    "check_output_dir",
    "earlier_run_files",
    "export",
    "finish",
    "fit",
    "hardware",
    "restore",
    "schedule_settings",
    "seed_everything",
    "train",
]

import itertools
import json
import os
import platform
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, unwrap_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import save_checkpoint
from ..convert import convert_to_deploy, is_deploy_form
from ..data import build_loader, num_classes_of
from ..guards import atomic_write, check_writable_dir
from ..quantize import finish_qat, prepare_qat
from .builders import build_data, build_datasets, build_loss, build_model
from .config import call_configured
from .distributed import DistEnv, barrier, cleanup_distributed, init_distributed, weight_divergence
from .engine import TrainStep, amp_dtype, compare_forms, evaluate, train_one_epoch
from .metrics_log import MetricsLog
from .state import LEGACY_STATE_FILE, STATE_FILE, load_training_state, rng_states, save_training_state

#: Minimum argmax agreement between train and deploy form on the validation set.
MIN_AGREEMENT = 0.9995
#: What a run writes in its output directory; any of them there means an earlier run.
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "metrics.png",
    STATE_FILE,
    LEGACY_STATE_FILE,
    "final.json",
    "model_train.safetensors",
    "model_deploy.safetensors",
)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints and exits after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def __call__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum


@dataclass
class Run:
    """Everything one training process holds."""

    cfg: dict
    env: DistEnv
    model: nn.Module  # unwrapped
    ddp_model: nn.Module  # what the steps call: DistributedDataParallel(model) or model
    train_loader: DataLoader
    val_loader: DataLoader
    step: TrainStep
    num_epochs: int
    num_classes: int
    epoch_steps: int  # training batches per epoch (per process), a multiple of step.accum_steps
    elapsed: float = 0.0  # seconds spent in training steps, over all resumed parts

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg["train"]["output_dir"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def hardware(env: DistEnv) -> str:
    """The machine a run used, in words."""
    if env.device.type == "cuda":
        return f"{env.world_size} x {torch.cuda.get_device_name(env.device)}"
    return (
        f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"{env.world_size} process(es) x {torch.get_num_threads()} thread(s)"
    )


def train(cfg: dict, resume: bool | str = False, overwrite: bool = False) -> dict[str, Any]:
    """Run training as configured; returns the final summary (also written to ``final.json``).

    Args:
        cfg: a config from :func:`repmlp.training.load_config`.
        resume: False, True (``<output_dir>/last_state.safetensors``) or a training-state path.
        overwrite: start afresh in an output directory that holds an earlier run, deleting that run's files
            (without it such a directory is refused, untouched).
    """
    env = init_distributed(cfg["train"]["device"])
    try:
        check_output_dir(Path(cfg["train"]["output_dir"]), resume, overwrite)
        barrier(env)  # every rank has looked before rank 0 writes anything
        run = build_run(cfg, env)
        start = restore(run, resume) if resume else _start_fresh(run, overwrite)
        interrupted = fit(run, *start)
        return interrupted or finish(run)
    finally:
        cleanup_distributed()


def build_run(cfg: dict, env: DistEnv) -> Run:
    """Model (on its device, optionally SyncBN / channels_last / checkpointing), loaders, optimizer,
    per-step LR schedule, EMA, AMP scaler, loss and Mixup."""
    t, o, s = cfg["train"], cfg["optimizer"], cfg["scheduler"]
    if t["threads"]:
        torch.set_num_threads(int(t["threads"]))
    seed_everything(t["seed"])
    (train_set,) = build_datasets(cfg, splits=("train",))
    num_classes = num_classes_of(train_set)
    qat = cfg["qat"]
    model = build_model(cfg, num_classes, deploy=qat["mode"] == "fc3_bn")
    train_loader, val_loader = build_data(cfg, model, env, train_set)
    accum = accumulation_steps(t["global_batch"], t["batch_size"], env.world_size)
    epoch_steps = len(train_loader) // accum * accum
    if epoch_steps == 0:
        raise ValueError(
            f"train.global_batch={t['global_batch']} needs {accum} batches per optimizer step but an epoch has "
            f"{len(train_loader)} per process; use more data or a smaller train.global_batch"
        )
    if t["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    if t["sync_bn"] and env.distributed:
        if env.device.type != "cuda":
            raise ValueError(
                "train.sync_bn=true needs GPUs (torch's SyncBatchNorm runs on CUDA only); "
                "set train.sync_bn=false for CPU runs"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device, memory_format=torch.channels_last if t["channels_last"] else torch.preserve_format)
    if qat["mode"] != "none":  # before the optimizer, EMA and DDP see the model: fc3_bn adds parameters
        batches = itertools.islice((x for x, _ in train_loader), qat["calibration_batches"])
        prepare_qat(model, qat["mode"], batches, qat["reduce_range"])
    dtype = amp_dtype(t["precision"], env.device)
    optimizer = call_configured(
        "optimizer.kwargs",
        create_optimizer_v2,
        model,
        opt=o["opt"],
        lr=o["lr"],
        weight_decay=o["weight_decay"],
        momentum=o["momentum"],
        filter_bias_and_bn=o["filter_bias_and_bn"],
        **o["kwargs"],
    )
    scheduler, num_epochs = call_configured(
        "scheduler.kwargs",
        create_scheduler_v2,
        optimizer,
        sched=s["sched"],
        num_epochs=t["epochs"],
        min_lr=s["min_lr"],
        warmup_epochs=s["warmup_epochs"],
        warmup_lr=s["warmup_lr"],
        step_on_epochs=s["step_on_epochs"],
        updates_per_epoch=epoch_steps // accum,
        **s["kwargs"],
    )
    e = cfg["ema"]
    ema = ModelEmaV3(model, decay=e["decay"], use_warmup=e["warmup"]) if e["enabled"] else None
    scaler = torch.amp.GradScaler(env.device.type) if dtype == torch.float16 else None
    loss_fn, mixup = build_loss(cfg, num_classes)
    step = TrainStep(
        optimizer,
        loss_fn,
        scheduler,
        mixup,
        ema,
        scaler,
        dtype,
        t["channels_last"],
        o["clip_grad"],
        o["clip_mode"],
        accum,
    )
    ddp_model = DistributedDataParallel(model) if env.distributed else model
    return Run(cfg, env, model, ddp_model, train_loader, val_loader, step, num_epochs, num_classes, epoch_steps)


def accumulation_steps(global_batch: int | None, batch_size: int, world_size: int) -> int:
    """Batches per optimizer step that make ``global_batch`` from ``batch_size`` on each of ``world_size``
    processes (1 when ``global_batch`` is None)."""
    if global_batch is None:
        return 1
    if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1:
        raise ValueError(f"train.global_batch must be null or a positive integer, got {global_batch!r}")
    per_step = batch_size * world_size
    if global_batch % per_step:
        fits = sorted({global_batch // (world_size * k) for k in range(1, 65) if global_batch % (world_size * k) == 0})
        raise ValueError(
            f"train.global_batch={global_batch} is not a multiple of train.batch_size x processes = {batch_size} x "
            f"{world_size} = {per_step}; batch sizes that fit {world_size} process(es): {fits[-6:] or 'none'}"
        )
    return global_batch // per_step


def earlier_run_files(out_dir: Path) -> list[str]:
    """Names of the files of an earlier run in ``out_dir``."""
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def check_output_dir(out_dir: Path, resume: bool | str, overwrite: bool) -> None:
    """Refuse, before any work, an output directory that cannot be written, or one that holds an earlier run
    when neither resuming nor overwriting."""
    if resume and overwrite:
        raise ValueError(
            "--resume continues the run in the output directory and --overwrite replaces it: give one of them"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"train.output_dir {out_dir} is a file; give a directory")
    check_writable_dir(out_dir, f"train.output_dir {out_dir}")
    found = earlier_run_files(out_dir)
    if found and not resume and not overwrite:
        raise FileExistsError(
            f"train.output_dir {out_dir} holds an earlier run ({', '.join(found)}); continue it "
            "with --resume, replace it with --overwrite, or give another --output directory"
        )


def _start_fresh(run: Run, overwrite: bool = False) -> tuple[int, int, int, None]:
    if run.env.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in earlier_run_files(run.out_dir):
                (run.out_dir / name).unlink()
        text = json.dumps(run.cfg, indent=2)
        atomic_write(run.out_dir / "config.json", lambda tmp: Path(tmp).write_text(text))
    return 0, 0, 0, None


def schedule_settings(run: Run) -> dict[str, Any]:
    """The settings the LR schedule is a function of (besides the update count)."""
    return {
        "train.epochs": run.cfg["train"]["epochs"],
        "optimizer.lr": run.cfg["optimizer"]["lr"],
        "updates_per_epoch": run.epoch_steps // run.step.accum_steps,
        **{f"scheduler.{k}": v for k, v in run.cfg["scheduler"].items()},
    }


def restore(run: Run, resume: bool | str) -> tuple[int, int, int, dict]:
    """Load the training state; returns (epoch, step in epoch, optimizer updates, RNG states).

    Changed schedule settings (e.g. more ``train.epochs``) rebuild the LR schedule for the new settings, at the
    saved position.
    """
    path = run.out_dir / STATE_FILE if resume is True else Path(resume)
    s = run.step
    state = load_training_state(path, run.model, s.optimizer, s.scheduler, s.ema, s.scaler, schedule_settings(run))
    if state["epoch"] > run.num_epochs:
        raise ValueError(
            f"cannot resume from {path}: it has done {state['epoch']} epochs but this run is "
            f"configured for {run.num_epochs}; set train.epochs to at least {state['epoch']}"
        )
    changes = state["schedule_changes"]
    if changes and s.scheduler is not None:
        s.scheduler.step(state["epoch"])  # set the LR the rebuilt schedule has at the saved position
        s.scheduler.step_update(num_updates=state["num_updates"])
    rng = state["rng"][run.env.rank] if isinstance(state["rng"], list) else state["rng"]
    run.elapsed = state.get("elapsed", 0.0)
    if run.env.is_main:
        MetricsLog(run.out_dir).truncate(state["epoch"])
        print(f"resumed from {path}: epoch {state['epoch']}, step {state['step_in_epoch']}", flush=True)
        if changes:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            print(
                f"note: schedule settings changed since the state was saved ({what}): the LR schedule is rebuilt "
                f"for the new settings and continues from update {state['num_updates']} (LR now "
                f"{s.optimizer.param_groups[0]['lr']:.3g})",
                flush=True,
            )
    return state["epoch"], state["step_in_epoch"], state["num_updates"], rng


def fit(run: Run, start_epoch: int, start_step: int, num_updates: int, rng: dict | None) -> dict[str, Any] | None:
    """Train from (epoch, start_step) to the end, checkpointing every epoch; on SIGINT/SIGTERM save the
    position and return what was interrupted (None when training completed)."""
    t, env = run.cfg["train"], run.env
    log, stop = MetricsLog(run.out_dir), StopFlag()
    stop.install()
    try:
        for epoch in range(start_epoch, run.num_epochs):
            # each epoch is a function of (seed, epoch), also resumed mid-epoch (then its RNG states are restored)
            seed_everything(t["seed"] + 1000 * epoch + env.rank)
            result = train_one_epoch(
                run.ddp_model,
                run.train_loader,
                run.step,
                env,
                epoch,
                num_updates,
                start_step,
                stop,
                t["progress"],
                rng if start_step else None,
                run.epoch_steps,
            )
            num_updates, start_step = result.num_updates, 0
            run.elapsed += result.seconds
            if result.interrupted:
                _save_state(run, epoch, result.steps, num_updates)
                if env.is_main:
                    print(
                        f"interrupted by signal {stop.signal} at epoch {epoch} step {result.steps}; state saved "
                        f"to {run.out_dir / STATE_FILE}; continue with --resume",
                        flush=True,
                    )
                return {"interrupted": True, "epoch": epoch, "step": result.steps}
            run.step.scheduler.step(epoch + 1)
            record = _epoch_record(run, epoch, result)
            _save_state(run, epoch + 1, 0, num_updates)
            if env.is_main:
                log.append(record)
                print(json.dumps(record), flush=True)
    finally:
        stop.restore()
    return None


def _epoch_record(run: Run, epoch: int, result: Any) -> dict[str, Any]:
    t, s = run.cfg["train"], run.step
    metrics = evaluate(run.ddp_model, run.val_loader, run.env, s.amp_dtype, t["channels_last"])
    record = {
        "epoch": epoch,
        "train_loss": result.loss,
        "train_top1": result.top1,
        "val_loss": metrics["loss"],
        "val_top1": metrics["top1"],
        "val_top5": metrics["top5"],
        "lr": s.optimizer.param_groups[0]["lr"],
        "epoch_seconds": result.seconds,
        "img_per_s": result.images / max(result.seconds, 1e-9),
    }
    if s.ema is not None:
        ema_metrics = evaluate(s.ema.module, run.val_loader, run.env, s.amp_dtype, t["channels_last"])
        record["ema_val_top1"] = ema_metrics["top1"]
    return record


def _save_state(run: Run, epoch: int, step_in_epoch: int, num_updates: int) -> None:
    """Rank 0 writes the training state; every rank's RNG state goes in it (ranks draw different numbers)."""
    rng = rng_states()
    if run.env.distributed:
        gathered = [None] * run.env.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    if run.env.is_main:
        s = run.step
        save_training_state(
            run.out_dir / STATE_FILE,
            run.model,
            s.optimizer,
            s.scheduler,
            s.ema,
            s.scaler,
            epoch,
            step_in_epoch,
            num_updates,
            extra={"elapsed": run.elapsed, "rng": rng, "schedule": schedule_settings(run)},
        )
    barrier(run.env)


def finish(run: Run) -> dict[str, Any]:
    """Check the replicas agree, then (rank 0) export both forms; writes and returns ``final.json``'s summary."""
    export_ema = run.step.ema is not None and run.cfg["train"]["export_ema"]
    summary = {
        "divergence": weight_divergence(run.model, run.env),
        "train_seconds": run.elapsed,
        "hardware": hardware(run.env),
        "exported": "ema" if export_ema else "model",
    }
    if run.env.is_main:
        model = run.step.ema.module if export_ema else run.model
        summary.update(export(model, run.cfg, run.val_loader.dataset, run.num_classes, run.out_dir))
        text = json.dumps(summary, indent=2)
        atomic_write(run.out_dir / "final.json", lambda tmp: Path(tmp).write_text(text))
        print(json.dumps(summary), flush=True)
    barrier(run.env)
    return summary


def export(model: nn.Module, cfg: dict, val_set: Dataset, num_classes: int, out_dir: Path) -> dict[str, Any]:
    """Convert to the deploy form, compare both forms on the whole validation set, save both forms (after QAT in
    fc3_bn mode, the model is a deploy form: that one form)."""
    model = finish_qat(unwrap_model(model)).float().eval()  # QAT: the plain float model, inserted FC3 BNs folded
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        plain = build_model(cfg, num_classes, deploy=is_deploy_form(model)).to(next(model.parameters()).device)
        plain.load_state_dict(model.state_dict())
        model = plain.eval()
    deploy = convert_to_deploy(model)
    val_loader = build_loader(val_set, cfg["train"]["eval_batch_size"], False, cfg["data"]["num_workers"])
    check = compare_forms(model, deploy, val_loader, next(model.parameters()).device)
    check["passed"] = check["argmax_agreement"] >= MIN_AGREEMENT
    meta = {
        "dataset": cfg["data"]["dataset"],
        "num_classes": str(num_classes),
        "model_kwargs": json.dumps(cfg["model"]["kwargs"]),
        "config": json.dumps(cfg),
    }
    forms = {"deploy": deploy} if is_deploy_form(model) else {"train": model, "deploy": deploy}
    files = {form: out_dir / f"model_{form}.safetensors" for form in forms}
    for form, form_model in forms.items():
        save_checkpoint(
            form_model, files[form], cfg["model"]["name"], form, {**meta, "top1": f"{check[f'{form}_top1']:.2f}"}
        )
    if not check["passed"]:
        print(
            f"WARNING: deploy form agrees with the train form on only {check['argmax_agreement']:.4%} of the "
            f"validation set (< {MIN_AGREEMENT:.2%})",
            flush=True,
        )
    return {"equivalence": check, "files": {k: str(v) for k, v in files.items()}}
