"""The training run: build everything from a config, train with checkpoints and metrics, then convert
to the deploy form, check it against the train form on the validation set and save both forms."""
from __future__ import annotations

import json
import os
import platform
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, unwrap_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..checkpoint import load_checkpoint, read_metadata, read_state_dict, save_checkpoint, state_dict_form
from ..convert import convert_to_deploy
from ..data import build_dataset, build_loader, build_transform, num_classes_of
from .distributed import DistEnv, barrier, cleanup_distributed, init_distributed, weight_divergence
from .engine import TrainStep, amp_dtype, compare_forms, evaluate, train_one_epoch
from .metrics_log import MetricsLog
from .state import STATE_FILE, load_training_state, rng_states, save_training_state

#: Minimum argmax agreement between train and deploy form on the validation set.
MIN_AGREEMENT = 0.9995


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints and exits at the next step."""

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def hardware(env: DistEnv, threads: int) -> str:
    if env.device.type == "cuda":
        return f"{env.world_size} x {torch.cuda.get_device_name(env.device)}"
    return (f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
            f"{env.world_size} process(es) x {threads} thread(s)")


def build_model(cfg: dict, num_classes: int, deploy: bool = False) -> nn.Module:
    m = cfg["model"]
    return timm.create_model(m["name"], pretrained=m["pretrained"], num_classes=num_classes, deploy=deploy,
                             **m["kwargs"])


def model_from_checkpoint(path: str | Path, model_name: str | None = None, form: str | None = None) -> nn.Module:
    """Build the model a safetensors checkpoint of :func:`train` describes (name, classes, kwargs in its
    metadata) in the requested form (default: the file's) and load it; a train-form file loads into a
    deploy-form model by conversion."""
    meta = read_metadata(path)
    name = model_name or meta.get("model")
    if not name:
        raise ValueError(f"{path} does not name its model (no 'model' metadata); pass the timm model name")
    form = form or meta.get("form") or state_dict_form(read_state_dict(path))
    if form not in ("train", "deploy"):
        raise ValueError(f"form must be 'train' or 'deploy', got {form!r}")
    kwargs = json.loads(meta.get("model_kwargs", "{}"))
    if "num_classes" in meta:
        kwargs["num_classes"] = int(meta["num_classes"])
    model = timm.create_model(name, deploy=form == "deploy", **kwargs)
    return load_checkpoint(model, path, train_model_factory=lambda: timm.create_model(name, **kwargs))


def data_config(cfg: dict, model: nn.Module) -> dict:
    """Input size, mean, std, crop_pct and interpolation: the model's pretrained_cfg, overridden by data.*."""
    d = cfg["data"]
    keys = ("input_size", "mean", "std", "crop_pct", "interpolation")
    return resolve_data_config({k: d[k] for k in keys if d[k] is not None}, model=model)


def build_data(cfg: dict, model: nn.Module, env: DistEnv) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders with timm transforms resolved from the model's pretrained_cfg."""
    d, t = cfg["data"], cfg["train"]
    data_cfg = data_config(cfg, model)
    common = dict(input_size=data_cfg["input_size"], mean=data_cfg["mean"], std=data_cfg["std"],
                  interpolation=data_cfg["interpolation"])
    train_set, val_set = _datasets(cfg, data_cfg["input_size"])
    train_set.transform = build_transform(True, crop_padding=d["crop_padding"], **common, **d["train_transform"])
    val_set.transform = build_transform(False, crop_pct=data_cfg["crop_pct"], **common)
    train_loader = build_loader(train_set, t["batch_size"], True, d["num_workers"], env.rank, env.world_size,
                                t["seed"])
    val_loader = build_loader(val_set, t["eval_batch_size"], False, d["num_workers"], env.rank, env.world_size)
    return train_loader, val_loader


def build_eval_data(cfg: dict, model: nn.Module, split: str = "val") -> DataLoader:
    """One process's loader over a whole split with the model's evaluation transform."""
    d, data_cfg = cfg["data"], data_config(cfg, model)
    transform = build_transform(False, data_cfg["input_size"], data_cfg["mean"], data_cfg["std"],
                                data_cfg["crop_pct"], data_cfg["interpolation"])
    dataset = _datasets(cfg, data_cfg["input_size"], splits=(split,))[0]
    dataset.transform = transform
    return build_loader(dataset, cfg["train"]["eval_batch_size"], False, d["num_workers"])


def _datasets(cfg: dict, input_size: tuple[int, ...] | None = None, splits: tuple[str, ...] = ("train", "val")):
    d = cfg["data"]
    extra = {}
    if d["dataset"] == "synthetic":
        extra = dict(d["synthetic"])
        if input_size is not None:
            extra.update(in_chans=input_size[0], img_size=input_size[-1])
    return tuple(build_dataset(d["dataset"], split, d["root"], **extra) for split in splits)


def build_loss(cfg: dict, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    a = cfg["augmentation"]
    if a["mixup"] > 0 or a["cutmix"] > 0 or a["cutmix_minmax"] is not None:
        mixup = Mixup(mixup_alpha=a["mixup"], cutmix_alpha=a["cutmix"], cutmix_minmax=a["cutmix_minmax"],
                      prob=a["mixup_prob"], switch_prob=a["mixup_switch_prob"], mode=a["mixup_mode"],
                      label_smoothing=a["label_smoothing"], num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if a["label_smoothing"] > 0:
        return LabelSmoothingCrossEntropy(a["label_smoothing"]), None
    return nn.CrossEntropyLoss(), None


def train(cfg: dict, resume: bool | str = False) -> dict[str, Any]:
    """Run training as configured; returns the final summary (also written to ``final.json``).

    Args:
        cfg: a config from :func:`repmlp.training.load_config`.
        resume: False, True (``<output_dir>/last.pth``) or a training-state path.
    """
    t = cfg["train"]
    env = init_distributed(t["device"])
    try:
        return _train(cfg, env, resume)
    finally:
        cleanup_distributed()


def _train(cfg: dict, env: DistEnv, resume: bool | str) -> dict[str, Any]:
    t, o = cfg["train"], cfg["optimizer"]
    out_dir = Path(t["output_dir"])
    if t["threads"]:
        torch.set_num_threads(int(t["threads"]))
    seed_everything(t["seed"])
    train_set, _ = _datasets(cfg)
    num_classes = num_classes_of(train_set)
    model = build_model(cfg, num_classes)
    train_loader, val_loader = build_data(cfg, model, env)
    if t["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    if t["sync_bn"] and env.distributed:
        if env.device.type != "cuda":
            raise ValueError("train.sync_bn=true needs GPUs (torch's SyncBatchNorm runs on CUDA only); "
                             "set train.sync_bn=false for CPU runs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device)
    if t["channels_last"]:
        model.to(memory_format=torch.channels_last)

    dtype = amp_dtype(t["precision"], env.device)
    optimizer = create_optimizer_v2(model, opt=o["opt"], lr=o["lr"], weight_decay=o["weight_decay"],
                                    momentum=o["momentum"], filter_bias_and_bn=o["filter_bias_and_bn"], **o["kwargs"])
    s = cfg["scheduler"]
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=s["sched"], num_epochs=t["epochs"], min_lr=s["min_lr"], warmup_epochs=s["warmup_epochs"],
        warmup_lr=s["warmup_lr"], step_on_epochs=s["step_on_epochs"], updates_per_epoch=len(train_loader),
        **s["kwargs"])
    e = cfg["ema"]
    ema = ModelEmaV3(model, decay=e["decay"], use_warmup=e["warmup"]) if e["enabled"] else None
    scaler = torch.amp.GradScaler(env.device.type) if dtype == torch.float16 else None
    loss_fn, mixup = build_loss(cfg, num_classes)
    ddp_model = DistributedDataParallel(model) if env.distributed else model
    step = TrainStep(optimizer, loss_fn, scheduler, mixup, ema, scaler, dtype, t["channels_last"], o["clip_grad"],
                     o["clip_mode"])

    log = MetricsLog(out_dir)
    start_epoch, start_step, num_updates, elapsed, resume_rng = 0, 0, 0, 0.0, None
    state_path = out_dir / STATE_FILE if resume is True else Path(resume) if resume else None
    if state_path is not None:
        state = load_training_state(state_path, model, optimizer, scheduler, ema, scaler)
        start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        num_updates, elapsed = state["num_updates"], state.get("elapsed", 0.0)
        resume_rng = state["rng"][env.rank] if isinstance(state["rng"], list) else state["rng"]
        if env.is_main:
            log.truncate(start_epoch)
            print(f"resumed from {state_path}: epoch {start_epoch}, step {start_step}", flush=True)
    elif env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))

    stop = StopFlag()
    stop.install()
    try:
        for epoch in range(start_epoch, num_epochs):
            if start_step == 0:
                seed_everything(t["seed"] + 1000 * epoch + env.rank)  # each epoch is a function of (seed, epoch)
            train_loader.sampler.set_epoch(epoch)
            train_loader.sampler.skip = start_step * t["batch_size"]
            result = train_one_epoch(ddp_model, train_loader, step, env, epoch, num_updates, start_step, stop,
                                     t["progress"], resume_rng if start_step else None)
            num_updates, start_step = result.num_updates, 0
            elapsed += result.seconds
            train_loader.sampler.skip = 0
            if result.interrupted:
                _save_state(out_dir, model, step, epoch, result.steps, num_updates, elapsed, env)
                if env.is_main:
                    print(f"interrupted by signal {stop.signal} at epoch {epoch} step {result.steps}; state saved "
                          f"to {out_dir / STATE_FILE}; continue with --resume", flush=True)
                return {"interrupted": True, "epoch": epoch, "step": result.steps}
            scheduler.step(epoch + 1)
            metrics = evaluate(ddp_model, val_loader, env, dtype, t["channels_last"])
            record = {"epoch": epoch, "train_loss": result.loss, "train_top1": result.top1,
                      "val_loss": metrics["loss"], "val_top1": metrics["top1"], "val_top5": metrics["top5"],
                      "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": result.seconds,
                      "img_per_s": result.images / max(result.seconds, 1e-9)}
            if ema is not None:
                record["ema_val_top1"] = evaluate(ema.module, val_loader, env, dtype, t["channels_last"])["top1"]
            _save_state(out_dir, model, step, epoch + 1, 0, num_updates, elapsed, env)
            if env.is_main:
                log.append(record)
                print(json.dumps(record), flush=True)
    finally:
        stop.restore()

    export = ema.module if ema is not None and t["export_ema"] else model
    summary = {"divergence": weight_divergence(model, env), "train_seconds": elapsed,
               "hardware": hardware(env, torch.get_num_threads())}
    if env.is_main:
        summary.update(finalize(export, cfg, val_loader.dataset, num_classes, out_dir))
        (out_dir / "final.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary), flush=True)
    barrier(env)
    return summary


def _save_state(out_dir: Path, model: nn.Module, step: TrainStep, epoch: int, step_in_epoch: int,
                num_updates: int, elapsed: float, env: DistEnv) -> None:
    """Rank 0 writes the training state; every rank's RNG state goes in it (ranks draw different numbers)."""
    rng = rng_states()
    if env.distributed:
        gathered = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    if env.is_main:
        save_training_state(out_dir / STATE_FILE, model, step.optimizer, step.scheduler, step.ema, step.scaler,
                            epoch, step_in_epoch, num_updates, extra={"elapsed": elapsed, "rng": rng})
    barrier(env)


def finalize(model: nn.Module, cfg: dict, val_set: Any, num_classes: int, out_dir: Path) -> dict[str, Any]:
    """Convert to the deploy form, compare both forms on the whole validation set, save both forms."""
    model = unwrap_model(model).float().eval()
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        plain = build_model(cfg, num_classes).to(next(model.parameters()).device)
        plain.load_state_dict(model.state_dict())
        model = plain.eval()
    deploy = convert_to_deploy(model)
    val_loader = build_loader(val_set, cfg["train"]["eval_batch_size"], False, cfg["data"]["num_workers"])
    check = compare_forms(model, deploy, val_loader, next(model.parameters()).device)
    check["passed"] = check["argmax_agreement"] >= MIN_AGREEMENT
    name = cfg["model"]["name"]
    meta = {"dataset": cfg["data"]["dataset"], "num_classes": str(num_classes),
            "model_kwargs": json.dumps(cfg["model"]["kwargs"]), "config": json.dumps(cfg)}
    files = {"train": out_dir / "model_train.safetensors", "deploy": out_dir / "model_deploy.safetensors"}
    save_checkpoint(model, files["train"], name, "train", {**meta, "top1": f"{check['train_top1']:.2f}"})
    save_checkpoint(deploy, files["deploy"], name, "deploy", {**meta, "top1": f"{check['deploy_top1']:.2f}"})
    if not check["passed"]:
        print(f"WARNING: deploy form agrees with the train form on only {check['argmax_agreement']:.4%} of the "
              f"validation set (< {MIN_AGREEMENT:.2%})", flush=True)
    return {"equivalence": check, "files": {k: str(v) for k, v in files.items()}}
