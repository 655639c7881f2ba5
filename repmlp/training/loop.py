"""The training run: build everything from a config, train with checkpoints and metrics, then convert
to the deploy form, check it against the train form on the validation set and save both forms."""

from __future__ import annotations

import itertools
import json
import math
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
from ..data import build_loader, label_names_of, num_classes_of
from ..guards import atomic_write
from ..preprocess import input_metadata
from ..quantize import finish_qat, prepare_qat
from .builders import build_data, build_datasets, build_loss, build_model, check_channels, data_config
from .config import RESUMED, call_configured
from .distributed import DistEnv, any_rank, barrier, cleanup_distributed, init_distributed, weight_divergence
from .engine import TrainStep, amp_dtype, compare_forms, evaluate, train_one_epoch
from .metrics_log import MetricsLog
from .rundir import MANIFEST, RunFiles, RunLock, check_output_dir, start_afresh, write_manifest
from .schema import check_resumable, check_schema
from .state import (
    STATE_FILE,
    load_training_state,
    read_state,
    rng_states,
    save_training_state,
)

#: Minimum argmax agreement between train and deploy form on the validation set.
MIN_AGREEMENT = 0.9995


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
    out_dir = Path(cfg["train"]["output_dir"])
    existed, lock = out_dir.exists(), None
    try:
        check_output_dir(out_dir, resume, overwrite)  # refused before anything is created
        lock = _lock(out_dir, env)
        files = check_output_dir(out_dir, resume, overwrite)  # again, now that no other run can write there
        barrier(env)  # every rank has looked before rank 0 writes anything
        run = build_run(cfg, env)
        start = restore(run, resume) if resume else _start_fresh(run, files)
        interrupted = fit(run, *start)
        return interrupted or finish(run)
    finally:
        if lock is not None:
            lock.release()
            if not existed and not any(out_dir.iterdir()):
                out_dir.rmdir()  # a refused run leaves nothing behind
        cleanup_distributed()


def _lock(out_dir: Path, env: DistEnv) -> RunLock | None:
    """Rank 0 locks the output directory (a second run into it is refused while this one holds it); every rank
    raises when it could not."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = RunLock.acquire(out_dir)
        except OSError as err:
            error = err
    if any_rank(error is not None, env):
        raise error or FileExistsError(f"train.output_dir {out_dir}: rank 0 could not lock it (see its error)")
    return lock


def build_run(cfg: dict, env: DistEnv) -> Run:
    """Model (on its device, optionally SyncBN / channels_last / checkpointing), loaders, optimizer,
    per-step LR schedule, EMA, AMP scaler, loss and Mixup."""
    t, o, s = cfg["train"], cfg["optimizer"], cfg["scheduler"]
    if t["threads"]:
        torch.set_num_threads(int(t["threads"]))
    seed_everything(t["seed"])
    if cfg["data"]["skip_bad_images"]:
        raise ValueError(
            "data.skip_bad_images is for evaluation (tools/eval.py --skip-bad-images); training stops at an image it "
            "cannot decode, naming it: remove or replace that file"
        )
    (train_set,) = build_datasets(cfg, splits=("train",))
    num_classes = num_classes_of(train_set)
    if num_classes < 2:
        raise ValueError(
            f"the training set of data.dataset={cfg['data']['dataset']} has {num_classes} class; a classifier needs "
            "at least 2 (one class trains to a meaningless 100%)"
        )
    qat = cfg["qat"]
    model = build_model(cfg, num_classes, deploy=qat["mode"] == "fc3_bn")
    train_loader, val_loader = build_data(cfg, model, env, train_set)
    check_channels(model, val_loader.dataset, cfg)  # its transform draws no random numbers
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


def _start_fresh(run: Run, files: RunFiles) -> tuple[int, int, int, None]:
    if run.env.is_main:
        deleted = start_afresh(run.out_dir, files)
        if deleted and not files.trained:
            print(f"note: an earlier attempt stopped before its first checkpoint; starting afresh over {deleted}")
        _write_config(run)
    return 0, 0, 0, None


def _write_config(run: Run, resumed: list | None = None) -> None:
    """The run's config.json: its config, and (resumed runs) each resumption's source and changed settings."""
    cfg = {**run.cfg, RESUMED: resumed} if resumed else run.cfg
    text = json.dumps(cfg, indent=2)
    atomic_write(run.out_dir / "config.json", lambda tmp: Path(tmp).write_text(text))


def schedule_settings(run: Run) -> dict[str, Any]:
    """The settings the LR schedule is a function of (besides the update count)."""
    return {
        "train.epochs": run.cfg["train"]["epochs"],
        "optimizer.lr": run.cfg["optimizer"]["lr"],
        "updates_per_epoch": run.epoch_steps // run.step.accum_steps,
        **{f"scheduler.{k}": v for k, v in run.cfg["scheduler"].items()},
    }


def restore(run: Run, resume: bool | str) -> tuple[int, int, int, dict | None]:
    """Load the training state; returns (epoch, step in epoch, optimizer updates, RNG states).

    The state is checked against this run before anything is loaded (:func:`repmlp.training.state.check_resumable`).
    Changed schedule settings (e.g. more ``train.epochs``) rebuild the LR schedule for the new settings, at the
    saved position; other allowed changes are stated and recorded in the run's config.json.
    """
    path = run.out_dir / STATE_FILE if resume is True else Path(resume)
    s, env = run.step, run.env
    state = read_state(path)
    check_schema(state, path)
    changes = check_resumable(state, path, run.cfg, run.num_classes, run.num_epochs, run.epoch_steps, env.world_size)
    state = load_training_state(
        path, run.model, s.optimizer, s.scheduler, s.ema, s.scaler, schedule_settings(run), state=state
    )
    schedule_changes = state["schedule_changes"]
    if schedule_changes and s.scheduler is not None:
        s.scheduler.step(state["epoch"])  # set the LR the rebuilt schedule has at the saved position
        s.scheduler.step_update(num_updates=state["num_updates"])
    rng = state["rng"]
    if isinstance(rng, list):  # one per process; used only mid-epoch, where the process count is the saved one
        rng = rng[env.rank] if env.rank < len(rng) else None
    run.elapsed = state.get("elapsed", 0.0)
    if env.is_main:
        MetricsLog(run.out_dir).truncate(state["epoch"])
        print(
            f"resumed from {path}: {state['epoch']} epochs done, epoch {state['epoch'] + 1} at step "
            f"{state['step_in_epoch']}",
            flush=True,
        )
        if schedule_changes:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in schedule_changes.items())
            print(
                f"note: schedule settings changed since the state was saved ({what}): the LR schedule is rebuilt "
                f"for the new settings and continues from update {state['num_updates']} (LR now "
                f"{s.optimizer.param_groups[0]['lr']:.3g})",
                flush=True,
            )
        if changes:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            print(f"note: resumed with changed settings ({what}); recorded in config.json", flush=True)
        if not (run.out_dir / MANIFEST).is_file():  # an earlier version's run, or a state from elsewhere
            write_manifest(run.out_dir)
        record = {"from": str(path), "epoch": state["epoch"], "step": state["step_in_epoch"], "changes": changes}
        _write_config(run, _resumptions(run.out_dir) + [record])
    return state["epoch"], state["step_in_epoch"], state["num_updates"], rng


def _resumptions(out_dir: Path) -> list:
    """The resumptions recorded in ``out_dir``'s config.json so far."""
    try:
        earlier = json.loads((out_dir / "config.json").read_text()).get(RESUMED, [])
    except (OSError, ValueError, AttributeError, RecursionError):
        return []
    return earlier if isinstance(earlier, list) else []


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
                        f"interrupted by signal {stop.signal} in epoch {epoch + 1} at step {result.steps}; state saved "
                        f"to {run.out_dir / STATE_FILE}; continue with --resume",
                        flush=True,
                    )
                return {"interrupted": True, "epoch": epoch, "step": result.steps}
            run.step.scheduler.step(epoch + 1)
            record = _epoch_record(run, epoch, result)
            _save_state(run, epoch + 1, 0, num_updates)
            if env.is_main:
                log.append(record)
                print(epoch_line(record, run.num_epochs), flush=True)
    finally:
        stop.restore()
    return None


def _epoch_record(run: Run, epoch: int, result: Any) -> dict[str, Any]:
    t, s = run.cfg["train"], run.step
    metrics = evaluate(run.ddp_model, run.val_loader, run.env, s.amp_dtype, t["channels_last"])
    record = {
        "epoch": epoch + 1,  # counted from 1 in every output: this line, metrics.jsonl, metrics.png, the state
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


def epoch_line(record: dict[str, Any], num_epochs: int) -> str:
    """One epoch's results as a line to read (``metrics.jsonl`` holds the same record as JSON)."""
    r = record
    line = (
        f"epoch {r['epoch']}/{num_epochs}: train loss {r['train_loss']:.4f} top-1 {r['train_top1']:.2f}% | "
        f"val loss {r['val_loss']:.4f} top-1 {r['val_top1']:.2f}% top-5 {r['val_top5']:.2f}%"
    )
    if "ema_val_top1" in r:
        line += f" | EMA val top-1 {r['ema_val_top1']:.2f}%"
    return line + f" | lr {r['lr']:.3g} | {r['epoch_seconds']:.1f} s, {r['img_per_s']:.0f} images/s"


def summary_line(summary: dict[str, Any]) -> str:
    """The end of a run as a line to read (``final.json`` holds the whole summary)."""
    check = summary.get("equivalence")
    if not check:
        return f"done in {summary['train_seconds']:.1f} s of training"
    forms = [form for form in ("train", "deploy") if f"{form}_top1" in check]
    top1 = ", ".join(f"{form} form {check[f'{form}_top1']:.2f}%" for form in forms)
    verdict = "PASS" if check.get("passed") else "FAIL"
    files = ", ".join(summary.get("files", {}).values())
    return (
        f"done: val top-1 {top1}; deploy vs train form: {verdict}, argmax agreement "
        f"{check['argmax_agreement']:.4%}; wrote {files} (final.json: the whole summary)"
    )


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
            extra={
                "elapsed": run.elapsed,
                "rng": rng,
                "schedule": schedule_settings(run),
                "config": run.cfg,  # what a resumed run must agree with (state.check_resumable)
                "num_classes": run.num_classes,
                "world_size": run.env.world_size,
            },
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
        print(summary_line(summary), flush=True)
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
    try:
        deploy = convert_to_deploy(model)
    except ValueError as err:  # non-finite weights (a diverged run): nothing to export, and never 'passed'
        print(f"WARNING: not exported: {err}", flush=True)
        return {"equivalence": {"passed": False, "error": str(err)}, "files": {}}
    val_loader = build_loader(val_set, cfg["train"]["eval_batch_size"], False, cfg["data"]["num_workers"])
    check = compare_forms(model, deploy, val_loader, next(model.parameters()).device)
    finite = all(math.isfinite(check[k]) for k in ("max_abs_err", "max_rel_err")) and "nonfinite" not in check
    check["passed"] = finite and check["argmax_agreement"] >= MIN_AGREEMENT
    meta = {
        "dataset": cfg["data"]["dataset"],
        "num_classes": str(num_classes),
        "model_kwargs": json.dumps(cfg["model"]["kwargs"]),
        "config": json.dumps(cfg),
        **input_metadata(model, data_config(cfg, model), label_names_of(val_set)),  # what predict needs
    }
    if not finite:  # nothing written: a model that outputs NaN is no result; final.json stays strict JSON
        print(f"WARNING: not exported: non-finite outputs on the validation set ({check.get('nonfinite')})", flush=True)
        check.update({k: None for k in ("max_abs_err", "max_rel_err") if not math.isfinite(check[k])})
        return {"equivalence": check, "files": {}}
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
