"""Objects a training run is made of, built from a config: model, datasets and loaders with timm
transforms, loss and Mixup."""

from __future__ import annotations

__all__ = [
    "build_data",
    "build_datasets",
    "build_eval_data",
    "build_loss",
    "build_model",
    "data_config",
    "eval_data_config",
]

import json

import timm
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..data import DATASETS, TIMM_SPECS, build_dataset, build_loader, build_transform
from ..sources import agree_with_record
from .config import call_configured, load_config
from .distributed import DistEnv


def build_model(cfg: dict, num_classes: int, deploy: bool = False) -> nn.Module:
    """``timm.create_model`` with the config's name, pretrained flag and kwargs."""
    m = cfg["model"]
    return call_configured(
        "model.kwargs",
        timm.create_model,
        m["name"],
        pretrained=m["pretrained"],
        num_classes=num_classes,
        **({"deploy": True} if deploy else {}),  # only our models take it: any timm model trains in train form
        **m["kwargs"],
    )


def data_config(cfg: dict, model: nn.Module) -> dict:
    """Input size, mean, std, crop_pct, interpolation (overridden by data.*) and crop_mode: the model's
    pretrained_cfg's."""
    d = cfg["data"]
    keys = ("input_size", "mean", "std", "crop_pct", "interpolation")
    return resolve_data_config({k: d[k] for k in keys if d[k] is not None}, model=model)


def build_data(
    cfg: dict, model: nn.Module, env: DistEnv, train_set: Dataset | None = None
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders with timm transforms resolved from the model's pretrained_cfg.

    ``train_set``: the train split already read (not for synthetic data, whose images take the model's input size),
    so that a large folder or tar is listed once.
    """
    d, t = cfg["data"], cfg["train"]
    data_cfg = data_config(cfg, model)
    common = dict(
        input_size=data_cfg["input_size"],
        mean=data_cfg["mean"],
        std=data_cfg["std"],
        interpolation=data_cfg["interpolation"],
    )
    if train_set is None or d["dataset"] == "synthetic":
        train_set, val_set = build_datasets(cfg, data_cfg["input_size"])
    else:
        (val_set,) = build_datasets(cfg, data_cfg["input_size"], splits=("val",))
    train_set.transform = call_configured(
        "data.train_transform", build_transform, True, crop_padding=d["crop_padding"], **common, **d["train_transform"]
    )
    val_set.transform = build_transform(False, crop_pct=data_cfg["crop_pct"], crop_mode=data_cfg["crop_mode"], **common)
    train_loader = build_loader(train_set, t["batch_size"], True, d["num_workers"], env.rank, env.world_size, t["seed"])
    val_loader = build_loader(val_set, t["eval_batch_size"], False, d["num_workers"], env.rank, env.world_size)
    return train_loader, val_loader


def build_eval_data(cfg: dict, model: nn.Module | None, split: str = "val") -> DataLoader:
    """One process's loader over a whole split with the model's evaluation transform (``model`` None: the one
    ``cfg``'s data section gives whole, e.g. as an ONNX file records it)."""
    d, data_cfg = cfg["data"], data_config(cfg, model)
    transform = build_transform(
        False,
        data_cfg["input_size"],
        data_cfg["mean"],
        data_cfg["std"],
        data_cfg["crop_pct"],
        data_cfg["interpolation"],
        crop_mode=data_cfg["crop_mode"],
    )
    dataset = build_datasets(cfg, data_cfg["input_size"], splits=(split,))[0]
    dataset.transform = transform
    check_channels(model, dataset, cfg, data_cfg["input_size"][0] if model is None else None)
    return build_loader(dataset, cfg["train"]["eval_batch_size"], False, d["num_workers"])


def check_channels(model: nn.Module | None, dataset: Dataset, cfg: dict, expected: int | None = None) -> None:
    """Refuse, before the first step (training) or batch (evaluation), a model whose input channels differ from the
    data's (one transformed sample's: an image folder gives RGB whatever the model takes), naming the fix.
    ``expected``: the channels where there is no model (an ONNX file's recorded input)."""
    expected = getattr(model, "in_chans", expected)  # timm's attribute: the built model's, whatever its pretrained_cfg
    if expected is None or isinstance(dataset, IterableDataset) or not len(dataset):
        return
    channels = dataset[0][0].shape[0]
    if channels != expected:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or cfg["model"]["name"]
        raise ValueError(
            f"model {name} takes {expected}-channel images but data.dataset={cfg['data']['dataset']} gives "
            f"{channels}-channel ones; set model.kwargs={{in_chans: {channels}}} (--set 'model.kwargs={{in_chans: "
            f"{channels}}}', keeping its other arguments; a pretrained stem is adapted to it, as timm does), or use "
            f"{expected}-channel data{' (image folders are read as RGB)' if channels == 3 else ''}"
        )


def build_datasets(
    cfg: dict, input_size: tuple[int, ...] | None = None, splits: tuple[str, ...] = ("train", "val")
) -> tuple[Dataset, ...]:
    """The configured dataset's splits, without transforms (synthetic images take ``input_size``)."""
    d = cfg["data"]
    extra = {}
    if d["dataset"] == "synthetic":
        extra = dict(d["synthetic"])
        if input_size is not None:
            extra.update(in_chans=input_size[0], img_size=input_size[-1])
    return tuple(
        call_configured(
            "data.synthetic",
            build_dataset,
            d["dataset"],
            split,
            d["root"],
            split_names={"train": d["train_split"], "val": d["val_split"]},
            classes=d["num_classes"],
            skip_bad_images=d["skip_bad_images"],
            **extra,
        )
        for split in splits
    )


def build_loss(cfg: dict, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """Loss and optional timm Mixup/CutMix (which then carries the label smoothing)."""
    a = cfg["augmentation"]
    if a["mixup"] > 0 or a["cutmix"] > 0 or a["cutmix_minmax"] is not None:
        mixup = Mixup(
            mixup_alpha=a["mixup"],
            cutmix_alpha=a["cutmix"],
            cutmix_minmax=a["cutmix_minmax"],
            prob=a["mixup_prob"],
            switch_prob=a["mixup_switch_prob"],
            mode=a["mixup_mode"],
            label_smoothing=a["label_smoothing"],
            num_classes=num_classes,
        )
        return SoftTargetCrossEntropy(), mixup
    if a["label_smoothing"] > 0:
        return LabelSmoothingCrossEntropy(a["label_smoothing"]), None
    return nn.CrossEntropyLoss(), None


def eval_data_config(
    record: dict[str, str],
    name: str,
    config: str | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """The config whose data section evaluates the model of ``record`` (a weights file's metadata): ``config``'s,
    else the training config the file records (its worker count aside), else the defaults; ``dataset`` (or
    ``config``'s dataset) must agree with the one the file records, and is required when it records none.

    Args:
        record: the file's metadata (:func:`repmlp.sources.read_record`).
        name: the file or model, for messages.
        config: a training config (YAML, or a run's config.json) to take the data section from.
        dataset: the dataset to evaluate on (one of ``repmlp.data.DATASETS``).
        data_root: its directory (default: the recorded one, or the dataset's default).
        overrides: ``key=value`` config overrides applied first (batch size, workers).
    """
    cfg = load_config(config, list(overrides))
    recorded = json.loads(record["config"])["data"] if "config" in record else {}
    if not config and recorded:
        cfg["data"].update({k: v for k, v in recorded.items() if k != "num_workers"})
    given = dataset or (cfg["data"]["dataset"] if config else None)
    dataset = agree_with_record("dataset", given, record.get("dataset"), name)
    if dataset is None:
        raise ValueError(
            f"{name} does not record its dataset; name it with --dataset "
            f"({', '.join(DATASETS + TIMM_SPECS)}) or --config"
        )
    if dataset != cfg["data"]["dataset"]:
        cfg["data"]["dataset"], cfg["data"]["root"] = dataset, None
    if data_root:
        cfg["data"]["root"] = data_root
    return cfg
