"""Where a tool's model comes from, one rule for every tool as timm's own scripts have it: ``--weights FILE`` builds
the model the file records (judged first: :mod:`repmlp.records`), filled in by the arguments, in the file's form
(:func:`repmlp.checkpoint.file_form`) unless one is asked for; ``--model NAME[.TAG] --pretrained`` loads registered
weights (timm's default tag without one); otherwise seeded random weights with randomised BN statistics. Every tool
prints :attr:`ModelSource.weights`, so a run always says which of the three it used."""

from __future__ import annotations

__all__ = [
    "ModelSource",
    "add_ema_argument",
    "add_model_arguments",
    "agree_with_record",
    "deploy_record",
    "model_from_checkpoint",
    "model_source",
    "read_record",
    "recorded_model_args",
]

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import records
from .checkpoint import file_form, load_checkpoint
from .cli.common import add_ema_argument, add_model_arguments  # noqa: F401 - their home before 0.2
from .convert import convert_to_deploy
from .models import MLPCifarNet, RepMLPNet, RepMLPResNet, load_model
from .publish import deploy_record  # noqa: F401 - its home before 0.2
from .shipped import resolve_weights, shipped_weights
from .verify import randomize_bn_stats
from .weights_file import PLAIN_STATE_DICT, WeightsFile


@dataclass
class ModelSource:
    """A tool's model and what is known of its weights."""

    model: nn.Module
    name: str  # timm NAME.TAG for registered weights, else the model name (or factory spec)
    weights: str  # where the weights come from, for the tool to print
    record: dict[str, str] = field(default_factory=dict)  # what the weights file records (dataset, config, ...)
    path: Path | None = None  # the weights file, where there is one

    @property
    def dataset(self) -> str | None:
        """``DATASET[:ROOT]`` the weights were trained on, as their file records it (None: not recorded, or
        synthetic data): its ``dataset``, else its training config's."""
        data = json.loads(self.record.get("config", "{}")).get("data", {})  # judged by read_record: an object
        dataset = self.record.get("dataset") or data.get("dataset")
        if not dataset or dataset == "synthetic":
            return None
        return ":".join(filter(None, (dataset, data.get("root"))))


def model_source(
    model: str | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    model_kwargs: dict | None = None,
    form: str | None = None,
    seed: int = 0,
    default: str = "repmlp_res50_light_224",
    use_ema: bool = False,
) -> ModelSource:
    """The model the rule of this module gives (``form``: 'train', 'deploy' or None for the weights' own form;
    random and registered weights are train form unless 'deploy' is asked for; ``use_ema``: a trainer checkpoint's
    EMA weights). A weights file is read once (:class:`repmlp.weights_file.WeightsFile`).

    Raises:
        ValueError: contradicting arguments, or weights that do not fit the model (the message says which).
    """
    kwargs = dict(model_kwargs or {})
    if weights is not None:
        if pretrained:
            raise ValueError("--pretrained and --weights both name weights; give one of them")
        file = WeightsFile.open(resolve_weights(weights), use_ema)  # a shipped folder by name or by its old path
        built = model_from_checkpoint(file, model, form, kwargs, use_ema)
        name = model or (getattr(built, "pretrained_cfg", None) or {}).get("architecture") or "model"
        label = f"weights {file.path}" + ("" if file.held == PLAIN_STATE_DICT else f": {file.held}")
        return ModelSource(built, name, label, judged_record(file.metadata, file.path), file.path)
    if use_ema:
        raise ValueError("--ema (use_ema) selects the EMA weights of a --weights file; give the file")
    name = model or default
    deploy = {"deploy": True} if form == "deploy" else {}
    if pretrained:
        built = load_model(name, pretrained=True, **kwargs, **deploy)
        cfg = built.pretrained_cfg
        tagged = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else name
        path = shipped_weights(tagged)
        return ModelSource(built, tagged, f"registered weights {tagged}", read_record(path) if path else {}, path)
    torch.manual_seed(seed)
    built = randomize_bn_stats(load_model(name, **kwargs), seed)
    if deploy:
        built = convert_to_deploy(built, inplace=True)
    return ModelSource(built, name, f"RANDOM weights (seed {seed}) with randomised BN statistics, no trained model")


def read_record(path: str | Path) -> dict[str, str]:
    """What a weights file records of its model and data, judged (:func:`judged_record`)."""
    file = WeightsFile.open(path)
    return judged_record(file.metadata, file.path)


def judged_record(metadata: dict[str, str], path: str | Path) -> dict[str, str]:
    """A file's metadata as far as it may be used (:mod:`repmlp.records`): its model a registered name, its
    ``num_classes`` a count, its ``model_kwargs`` the family's constructor arguments; a dataset (its own, or its
    training ``config``'s) only where it is known and on a local path, else dropped."""
    record, where = dict(metadata), f"{path}: field"
    if "model" in record:
        record["model"] = name = records.model_name(record["model"], str(path))
        kwargs = records.parse_json(record.get("model_kwargs", "{}"), f"{where} 'model_kwargs'")
        record["model_kwargs"] = json.dumps(records.model_args(family(name), kwargs, f"{where} 'model_kwargs'"))
    if not re.fullmatch(r"\d{1,7}", str(record.get("num_classes", "0"))):
        raise ValueError(
            f"{where} 'num_classes' is {record['num_classes']!r}, not a count of classes; fix the file or give "
            "--model-kwargs '{\"num_classes\": N}'"
        )
    if "config" in record:
        config = records.parse_json(record["config"], f"{where} 'config'")
        data = config.get("data", {}) if isinstance(config, dict) else None
        if not isinstance(data, dict):
            raise ValueError(f"{where} 'config' must be a JSON object with a 'data' object, got {config!r:.100}")
        recorded = data.get("dataset")
        data["dataset"], data["root"] = records.dataset(recorded, data.get("root"), f"{where} 'config'")
        record["config"] = json.dumps({**config, "data": {k: v for k, v in data.items() if v is not None}})
        if recorded is not None and data["dataset"] is None:
            record.pop("dataset", None)
    if "dataset" in record and records.dataset(record["dataset"], None, f"{where} 'dataset'")[0] is None:
        del record["dataset"]
    return record


def family(name: str) -> type | None:
    """The zoo's model class that the registered timm model ``name`` builds, or None for a model outside it."""
    import timm

    module = timm.models.model_entrypoint(name.split(".")[0]).__module__
    return next((c for c in (MLPCifarNet, RepMLPNet, RepMLPResNet) if c.__module__ == module), None)


def agree_with_record(what: str, given: object, saved: object, path: str | Path) -> object:
    """``given`` where the file at ``path`` records nothing, else the recorded value; a contradiction is a ValueError
    naming both (sequences compare by their items: JSON records lists)."""
    plain = [list(v) if isinstance(v, tuple) else v for v in (given, saved)]
    if given is not None and saved is not None and plain[0] != plain[1]:
        raise ValueError(
            f"{what} {given!r} contradicts {path}, which records {what} {saved!r}; drop the argument "
            "or give the recorded value"
        )
    return saved if given is None else given


def recorded_model_args(
    path: str | Path | WeightsFile, model_name: str | None = None, model_kwargs: dict | None = None
) -> tuple[str, dict, str | None]:
    """(model name, constructor kwargs, requested form) of a weights file: its judged metadata (model, model_kwargs,
    num_classes; :func:`judged_record`) merged with the arguments, which fill what it lacks; a contradiction is a
    ValueError naming both. ``model_kwargs`` may hold ``deploy`` (a form request) and ``num_classes``."""
    file = path if isinstance(path, WeightsFile) else WeightsFile.open(path)
    kwargs, meta = dict(model_kwargs or {}), judged_record(file.metadata, file.path)
    requested = ("deploy" if kwargs.pop("deploy") else "train") if "deploy" in kwargs else None
    untagged = model_name.split(".")[0] if model_name and ":" not in model_name else model_name  # timm NAME.TAG
    agree_with_record("model", untagged, meta.get("model") or None, file.path)
    name = model_name or meta.get("model")
    if not name:
        raise ValueError(
            f"{file.path} does not record its model (no 'model' metadata, e.g. the authors' files); "
            "pass the model name (--model NAME)"
        )
    saved = json.loads(meta.get("model_kwargs", "{}")) | (
        {"num_classes": int(meta["num_classes"])} if "num_classes" in meta else {}
    )
    for key in set(kwargs) & set(saved):
        agree_with_record(f"model argument {key}", kwargs[key], saved[key], file.path)
    return name, {**saved, **kwargs}, requested


def model_from_checkpoint(
    path: str | Path | WeightsFile,
    model_name: str | None = None,
    form: str | None = None,
    model_kwargs: dict | None = None,
    use_ema: bool = False,
) -> nn.Module:
    """Build the model a weights file describes (see :func:`recorded_model_args`) in the requested form (default:
    the file's, judged by structure) and load it; a train-form file loads into a deploy-form model by conversion.
    ``model_name`` is the caller's timm name or ``package.module:factory``; ``use_ema`` loads a trainer checkpoint's
    EMA weights. The file is read once."""
    file = path if isinstance(path, WeightsFile) else WeightsFile.open(path, use_ema)
    name, kwargs, requested = recorded_model_args(file, model_name, model_kwargs)
    form = agree_with_record("form", form, requested, "--model-kwargs") if requested else form
    if form not in (None, "train", "deploy"):
        raise ValueError(f"form must be 'train' or 'deploy', got {form!r}")
    asked = set(model_kwargs or {})  # the caller's own arguments: only these may give the file a fresh head
    if ":" not in name:  # a registered model (a factory is the caller's own code): built on meta first
        records.check_buildable(lambda: load_model(name, **kwargs), f"{file.path}: {name} with {kwargs}")
    try:
        train = load_model(name, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file.path}: cannot build {name} with {kwargs}: {err}") from None
    form = form or file_form(file.state, train) or "train"  # no match: the strict load says why
    if form == "train":
        return load_checkpoint(train, file, asked=asked)
    model = load_model(name, **kwargs, deploy=True)
    return load_checkpoint(model, file, train_model_factory=lambda: train, asked=asked)  # the twin, built once
