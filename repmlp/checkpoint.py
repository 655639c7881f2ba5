"""Loading weights into a model: renamed from the family's key layouts, judged by structure (train or deploy form,
converted through the train-form twin), strict about keys, shapes, dtypes and trained heads, with clear errors.
Reading the file is :mod:`repmlp.weights_file`'s; judging what it says of itself, :mod:`repmlp.records`'."""

from __future__ import annotations

__all__ = [
    "PLAIN_STATE_DICT",
    "checkpoint_filter_fn",
    "file_form",
    "load_checkpoint",
    "prepare_state_dict",
    "read_checkpoint",
    "read_metadata",
    "read_state_dict",
    "save_checkpoint",
    "write_folder",
]

import copy
import functools
import logging
import os
from collections.abc import Callable, Collection

import torch
from timm.models import adapt_input_conv
from torch import nn

from .authors import keys_to_ours
from .convert import convert_to_deploy, is_deploy_form, reparameterizable
from .publish import save_checkpoint, write_folder  # their home before 0.2
from .weights_file import PLAIN_STATE_DICT, WeightsFile

_logger = logging.getLogger(__name__)
Factory = Callable[[], nn.Module]
Filter = Callable[[dict, nn.Module], dict]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A weights file's metadata (or a timm ``train.py`` checkpoint's ``args``) as the file says it, unjudged."""
    return WeightsFile.open(path).metadata


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a weights file or model folder (:class:`repmlp.weights_file.WeightsFile`)."""
    return WeightsFile.open(path, use_ema).state


def read_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a weights file and what the file held."""
    weights = WeightsFile.open(path, use_ema)
    return weights.state, weights.held


def file_form(
    state: dict, model: nn.Module, filter_fn: Filter | None = None, train_model_factory: Factory | None = None
) -> str | None:
    """The form of a state dict judged against ``model``'s structure, by the rule :func:`prepare_state_dict` applies:
    'train' when, in our keys, it has those of the train-form twin; 'deploy' when it has those of a twin with some or
    all blocks re-parameterized (ours, the authors' inference forms); None for neither."""
    twin, _, reparameterized = _twin(model, _renamed(state, model, filter_fn), train_model_factory)
    return None if twin is None else "deploy" if reparameterized else "train"


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike | WeightsFile,
    filter_fn: Filter | None = None,
    train_model_factory: Factory | None = None,
    allow_nonfinite: bool = False,
    use_ema: bool = False,
    asked: Collection[str] = (),
) -> nn.Module:
    """Load weights strictly into ``model`` (train or deploy form), in place; returns ``model``. The one path every
    loader takes (``create_model(pretrained=True)``, the tools, training): see :func:`prepare_state_dict`.

    Args:
        model: destination.
        path: a weights file or model folder (ours, the authors', a plain or wrapped state dict, a trainer's
            checkpoint), or one already read (:class:`repmlp.weights_file.WeightsFile`).
        filter_fn: key renames of foreign layouts (default: from the layouts of ``model.key_layouts``).
        train_model_factory: builds the train-form twin (default: ``model.train_form_twin``).
        allow_nonfinite: accept NaN/Inf weights (for debugging a diverged run).
        use_ema: load a trainer checkpoint's EMA weights (``state_dict_ema``).
        asked: the constructor arguments the caller gave explicitly (``num_classes``, ``in_chans``): only for
            those may the file's classifier or stem differ from the model's (:func:`_check_heads`).
    """
    weights = path if isinstance(path, WeightsFile) else WeightsFile.open(path, use_ema)
    source = str(weights.path)
    state = prepare_state_dict(weights.state, model, filter_fn, train_model_factory, allow_nonfinite, source, asked)
    _strict_load(model, state, source)
    return model


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The families' ``pretrained_filter_fn`` for timm's builder (and a filter for ``timm.models.load_checkpoint``):
    :func:`prepare_state_dict`."""
    return prepare_state_dict(state_dict, model)


def prepare_state_dict(
    state: dict[str, torch.Tensor],
    model: nn.Module,
    filter_fn: Filter | None = None,
    train_model_factory: Factory | None = None,
    allow_nonfinite: bool = False,
    source: str = "state dict",
    asked: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """A state dict in ``model``'s form and layout, from ours or a foreign one, train or deploy form.

    Steps: rename keys (``filter_fn``); check dtypes and trained heads (:func:`_check_heads`); keep the model's
    global perceptrons where the file was trained at another partition grid (:func:`_adapt_to_partitions`). A file
    with the model's keys then loads as it is; any other goes through a train-form twin re-parameterized where the
    file is (:func:`_twin`) and converted, which a deploy-form model accepts and a train-form one refuses (the
    branches cannot be recovered). Keys and shapes are checked before any value is read (NaN or Inf are errors
    unless ``allow_nonfinite``).
    """
    raw, state = state, _renamed(state, model, filter_fn)
    expected = model.state_dict()
    _check_dtypes(state, expected, source)
    state = _check_heads(state, model, expected, source, asked)
    closest = None
    if getattr(model, "key_layouts", ()):
        closest = functools.partial(_no_layout_matches, raw, model, train_model_factory, source)
    adapted, resized = _adapt_to_partitions(state, model)
    if set(adapted) == set(expected):  # the model's own form
        _say_resized(source, resized)
        _refuse_mismatches(expected, adapted, source, allow_nonfinite, closest)
        return adapted
    twin, adapted, reparameterized = _twin(model, state, train_model_factory, source)
    if twin is not None and reparameterized and not is_deploy_form(model):
        raise ValueError(
            f"{source} holds a deploy-form (re-parameterized) checkpoint; its conv and BN branches cannot be "
            "recovered, so it loads only into a deploy-form model: build it with deploy=True "
            "(e.g. timm.create_model(name, deploy=True))."
        )
    if twin is None:
        if closest:
            raise ValueError(closest())
        return adapted  # the strict load lists what does not match
    _strict_load(twin, adapted, f"{source} (as a train-form twin)", True, allow_nonfinite, closest)
    return convert_to_deploy(twin, inplace=True).state_dict()


def _renamed(state: dict, model: nn.Module, filter_fn: Filter | None) -> dict:
    """``state`` in our keys: ``filter_fn``'s renames, else those of the family's layout the keys show."""
    if filter_fn is not None:
        return filter_fn(state, model)
    layouts = getattr(model, "key_layouts", ())
    return keys_to_ours(state, model, layouts) if layouts else state


def _twin(
    model: nn.Module, state: dict, factory: Factory | None, source: str | None = None
) -> tuple[nn.Module | None, dict, bool]:
    """A train-form twin of ``model`` built on the meta device (the file's tensors are then assigned to it, not
    initialised only to be overwritten), ``state`` adapted to its partitions, and whether blocks were
    re-parameterized (innermost first) where the state lacks their train-only keys; (None, ...) when no such twin
    has the state's keys. A train-form model without a factory is its own twin (copied)."""
    factory = factory or getattr(model, "train_form_twin", None)
    if factory is None and not is_deploy_form(model):
        factory = functools.partial(copy.deepcopy, model)
    if factory is None:
        return None, state, False
    with torch.device("meta"):
        twin = factory()
    state, resized = _adapt_to_partitions(state, twin)
    reparameterized = _reparameterize_where_missing(twin, set(state))
    if set(twin.state_dict()) != set(state):
        return None, state, reparameterized
    _say_resized(source, resized)
    return twin, state, reparameterized


def _reparameterize_where_missing(twin: nn.Module, keys: set[str], most: bool = False) -> bool:
    """Re-parameterize (innermost first, in place) the blocks of ``twin`` whose train-form keys ``keys`` lacks (any
    of them, or with ``most`` more than half: a near miss's guess); whether any were."""
    reparameterized = False
    for name, module in reversed(reparameterizable(twin)):
        own = [f"{name}.{k}" if name else k for k in module.state_dict()]
        if not getattr(module, "deploy", False) and sum(k not in keys for k in own) > (len(own) // 2 if most else 0):
            module.reparameterize()
            reparameterized = True
    return reparameterized


def _no_layout_matches(state: dict, model: nn.Module, factory: Factory | None, source: str) -> str:
    """The error for a file that fits ``model`` in none of its family's ``key_layouts``: each layout's rename of the
    file is compared with the model and with the (partly) re-parameterized twin its keys suggest, and the closest
    comparison's mismatches are named."""
    factory = factory or getattr(model, "train_form_twin", None)
    closest = None
    for layout in model.key_layouts:
        renamed = layout.to_ours(dict(state), model)
        forms = [model]
        if factory is not None:
            with torch.device("meta"):
                forms.append(factory())
            _reparameterize_where_missing(forms[-1], set(renamed), most=True)
        for form in forms:
            found = _mismatches(_shapes(form), renamed, source)
            if closest is None or found[0] < closest[1][0]:
                closest = layout.name, found
    tried = ", ".join(layout.name for layout in model.key_layouts)
    return closest[1][1] + (
        f" (keys in our names; the file read as {closest[0]}, the closest of the layouts tried: {tried})"
    )


def _check_dtypes(state: dict, expected: dict, source: str) -> None:
    """Refuse complex or integer tensors for float parameters; note lower-precision floats (any float file loads
    into a model of any float dtype)."""
    floats = {k: v for k, v in state.items() if k in expected and expected[k].is_floating_point()}
    wrong = [k for k, v in floats.items() if not v.is_floating_point()]
    if wrong:
        kind = "complex" if floats[wrong[0]].is_complex() else "integer"
        raise ValueError(
            f"{source}: {kind} tensors for float parameters (the file was saved with the wrong dtype): "
            f"{_show(wrong)}, e.g. {floats[wrong[0]].dtype}"
        )
    lower = [k for k, v in floats.items() if torch.finfo(v.dtype).bits < torch.finfo(expected[k].dtype).bits]
    if lower:
        e = lower[0], state[lower[0]].dtype, expected[lower[0]].dtype
        _logger.warning(
            "%s: %d tensors stored in lower precision than the model's (e.g. %s %s); cast to %s", source, len(lower), *e
        )


def _check_heads(state: dict, model: nn.Module, expected: dict, source: str, asked: Collection[str]) -> dict:
    """The rule for trained heads, decided against the file's own tensors: a classifier (timm's ``classifier``) or
    stem (``first_conv``) whose shape equals the model's loads; one that differs is replaced by the model's fresh
    classifier (or, for the stem, adapted by timm's ``adapt_input_conv``) only when the caller asked for
    ``num_classes`` (``in_chans``) explicitly (``asked``); otherwise a ValueError names the argument that would load
    the file. (timm's loader compares with ``pretrained_cfg['num_classes']`` instead, which would drop a 3-class
    file's trained head when ``num_classes=3`` is asked for.)"""
    cfg, state = getattr(model, "pretrained_cfg", None) or {}, dict(state)
    conv = f"{cfg['first_conv']}.weight" if cfg.get("first_conv") else None
    if conv in state and conv in expected and state[conv].dim() == expected[conv].dim() == 4:
        (out, theirs), ours = state[conv].shape[:2], expected[conv].shape[1]
        if theirs != ours and out == expected[conv].shape[0]:
            if "in_chans" not in asked:
                raise ValueError(
                    f"{source} holds a stem for {theirs} input channels, the model takes {ours}: pass "
                    f"in_chans={theirs} to load it as trained (or in_chans={ours} explicitly to adapt the stem)"
                )
            state[conv] = adapt_input_conv(ours, state[conv], base_chans=theirs)
            _logger.warning("%s: in_chans=%d asked: the stem %s adapted from %d channels", source, ours, conv, theirs)
    prefix = f"{cfg['classifier']}." if cfg.get("classifier") else "\0"
    theirs = {k: v for k, v in state.items() if k.startswith(prefix)}
    fits_elsewhere = any(k in expected for k in state if k not in theirs)  # else: another layout, listed later
    if fits_elsewhere and _shapes(theirs) != _shapes({k: v for k, v in expected.items() if k.startswith(prefix)}):
        weight = theirs.get(f"{prefix}weight")
        classes = weight.shape[0] if weight is not None and weight.dim() else 0
        if "num_classes" not in asked:
            held = f"a classifier for {classes} classes" if classes else "no classifier"
            raise ValueError(
                f"{source} holds {held}, the model has {model.num_classes} classes: pass num_classes={classes} to "
                "load it as trained (or another num_classes explicitly for a fresh classifier)"
            )
        state = {k: v for k, v in state.items() if k not in theirs}
        state |= {k: v for k, v in expected.items() if k.startswith(prefix)}
        _logger.warning(
            "%s: num_classes=%s asked: a fresh classifier replaces the file's (%d classes)",
            source,
            model.num_classes,
            classes,
        )
    return state


def _adapt_to_partitions(state: dict, model: nn.Module) -> tuple[dict, list[str]]:
    """``state`` with ``model``'s own global perceptrons (a block's ``partition_dependent`` children, fc1/fc2 over
    C * hp * wp) wherever the file's fc1/fc2 differ: weights trained at another input size (another grid, or none at
    one partition) keep fresh fc1/fc2 (the paper's recipe, v1 Sec. 4.4), initialised here where ``model`` is a twin
    on the meta device; a BN loads from the file where both have it. Also the names of those adapted."""
    if not set(state) & set(model.state_dict()):
        return state, []  # another layout altogether (the strict load lists it), not another grid
    state, resized = dict(state), []
    for name, block in model.named_modules():
        for child_name in getattr(block, "partition_dependent", ()):
            prefix, child = f"{name}.{child_name}." if name else f"{child_name}.", getattr(block, child_name)
            fc = (prefix + "fc1.", prefix + "fc2.")
            ours = {prefix + k: v for k, v in (child.state_dict() if child is not None else {}).items()}
            if _shapes({k: v for k, v in state.items() if k.startswith(fc)}) == _shapes(
                {k: v for k, v in ours.items() if k.startswith(fc)}
            ):
                continue
            if any(v.is_meta for v in ours.values()):
                child.to_empty(device="cpu")
                for module in child.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
                ours = {prefix + k: v for k, v in child.state_dict().items()}
            for key in [k for k in state if k.startswith(prefix)]:
                if key.startswith(fc) or key not in ours or state[key].shape != ours[key].shape:
                    del state[key]
            state |= {k: v for k, v in ours.items() if k not in state}
            resized.append(prefix[:-1])
    return state, resized


def _say_resized(source: str | None, resized: list[str]) -> None:
    if source and resized:
        _logger.warning(
            "%s: trained at another number of partitions; %d global perceptrons keep their fresh fc1/fc2: %s",
            source,
            len(resized),
            _show(resized),
        )


def _shapes(state: dict[str, torch.Tensor] | nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in (state.state_dict() if isinstance(state, nn.Module) else state).items()}


def _show(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") + "]"


def _mismatches(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], source: str) -> tuple[int, str]:
    """How many keys ``state`` lacks, has in excess or holds in another shape than ``expected``, and the error
    naming them."""
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v
    ]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    text = (
        f"{source} does not match the model: missing keys {_show(missing)}, unexpected keys {_show(unexpected)}, "
        f"shape mismatches {_show(shapes)}"
    )
    return len(missing) + len(unexpected) + len(shapes), text


def _refuse_mismatches(
    expected: dict, state: dict, source: str, allow_nonfinite: bool, closest: Callable[[], str] | None = None
) -> None:
    """A ValueError naming every missing and unexpected key and every shape that differs (``closest``: the error
    naming the family's closest layout instead); then, unless ``allow_nonfinite``, every tensor with NaN or Inf
    (read only once keys and shapes are known to fit)."""
    count, text = _mismatches(_shapes(expected), state, source)
    if count:
        raise ValueError(closest() if closest else text)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad and not allow_nonfinite:
        raise ValueError(
            f"{source}: NaN or Inf values in {_show(bad)} (pass allow_nonfinite=True to load them anyway, e.g. to "
            "debug a diverged run)"
        )


def _strict_load(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    assign: bool = False,
    allow_nonfinite: bool = True,
    closest: Callable[[], str] | None = None,
) -> None:
    """``model.load_state_dict(state, strict=True)``, refused before a value is copied as :func:`_refuse_mismatches`
    says. ``assign``: the model's tensors become ``state``'s, in the model's dtypes (a twin on the meta device)."""
    expected = model.state_dict()
    _refuse_mismatches(expected, state, source, allow_nonfinite, closest)
    if assign:  # the file's tensors themselves (conversion writes new tensors), in the twin's dtypes
        state = {k: v.to(dtype=expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)
