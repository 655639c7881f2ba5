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


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Metadata of a safetensors file or model folder, or what a timm ``train.py`` checkpoint's ``args`` record, as
    the file says it (unjudged: :mod:`repmlp.sources` judges it)."""
    return WeightsFile.open(path).metadata


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a weights file or model folder (:class:`repmlp.weights_file.WeightsFile`), logging what
    the file held where it held more."""
    return _opened(path, use_ema).state


def _opened(path: str | os.PathLike | WeightsFile, use_ema: bool = False) -> WeightsFile:
    """``path`` read (unless it is read already), what it held besides a state dict logged."""
    weights = path if isinstance(path, WeightsFile) else WeightsFile.open(path, use_ema)
    if weights.held != PLAIN_STATE_DICT:
        _logger.info("%s: %s", weights.path, weights.held)
    return weights


def read_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a weights file and what the file held (see :class:`repmlp.weights_file.WeightsFile`)."""
    weights = WeightsFile.open(path, use_ema)
    return weights.state, weights.held


def file_form(
    state: dict[str, torch.Tensor],
    model: nn.Module,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    train_model_factory: Callable[[], nn.Module] | None = None,
) -> str | None:
    """The form of a state dict, judged against ``model``'s structure (the one rule for it, which
    :func:`prepare_state_dict` and the tools both apply): 'train' when, renamed into our layout, it has the keys of
    the train-form twin; 'deploy' when it has them of a twin with some or all blocks re-parameterized (our deploy
    form, the authors' inference forms); None when it matches neither (a strict load then lists the mismatches)."""
    twin, reparameterized = _matching_twin(model, _renamed(state, model, filter_fn), train_model_factory)
    return None if twin is None else "deploy" if reparameterized else "train"


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike | WeightsFile,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    train_model_factory: Callable[[], nn.Module] | None = None,
    allow_nonfinite: bool = False,
    use_ema: bool = False,
    asked: Collection[str] = (),
) -> nn.Module:
    """Load weights strictly into ``model`` (train or deploy form), in place; returns ``model``. The one path every
    loader takes (``create_model(pretrained=True)``, the tools, training): see :func:`prepare_state_dict`.

    Args:
        model: destination.
        path: a weights file or model folder (ours, the authors', a plain or wrapped state dict, a trainer's
            checkpoint; :class:`repmlp.weights_file.WeightsFile`), or one already read.
        filter_fn: key renames of foreign layouts (default: from the layouts of ``model.key_layouts``).
        train_model_factory: builds the train-form twin (default: ``model.train_form_twin``).
        allow_nonfinite: accept NaN/Inf weights (for debugging a diverged run).
        use_ema: load a trainer checkpoint's EMA weights (``state_dict_ema``).
        asked: the constructor arguments the caller gave explicitly (``num_classes``, ``in_chans``): only for
            those may the file's classifier or stem differ from the model's (:func:`_check_heads`).
    """
    weights = _opened(path, use_ema)
    source = str(weights.path)
    state = prepare_state_dict(
        weights.state, model, filter_fn, train_model_factory, allow_nonfinite, source=source, asked=asked
    )
    _strict_load(model, state, source)
    return model


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Filter for ``timm.models.load_checkpoint(model, path, filter_fn=repmlp.checkpoint_filter_fn)``: the same
    decisions as :func:`load_checkpoint`, returning the state dict for ``model.load_state_dict``."""
    return prepare_state_dict(state_dict, model)


def prepare_state_dict(
    state: dict[str, torch.Tensor],
    model: nn.Module,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    train_model_factory: Callable[[], nn.Module] | None = None,
    allow_nonfinite: bool = False,
    source: str = "state dict",
    asked: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """A state dict in ``model``'s form and layout, from ours or a foreign one, train or deploy form.

    Steps: rename keys (``filter_fn``); dtypes (:func:`_check_dtypes`), trained heads (:func:`_check_heads`) and
    partitions (:func:`_adapt_to_partitions`); then judge the file against the model's structure: a file in the
    model's form loads as it is; a (partly) re-parameterized one offered to a deploy-form model is loaded into a
    train-form twin re-parameterized to match, and converted; offered to a train-form model, a ValueError (the
    branches cannot be recovered). Keys and shapes are checked before any value is read (NaN or Inf are errors
    unless ``allow_nonfinite``).
    """
    raw, state = state, _renamed(state, model, filter_fn)
    expected = model.state_dict()
    _check_dtypes(state, expected, source)
    state = _check_heads(state, model, expected, source, asked)
    resized = _resized_children(state, model, expected)
    factory = train_model_factory or getattr(model, "train_form_twin", None)
    if resized and factory is not None and is_deploy_form(model):  # a train-form file is adapted so, then converted
        twin = factory()  # initialised: the resized global perceptrons keep its fresh fc1/fc2
        twin_expected = twin.state_dict()
        twin_state = _adapt_to_partitions(state, twin_expected, _resized_children(state, twin, twin_expected), source)
        if set(twin_state) == set(twin_expected):  # the twin's keys: a train-form file
            _strict_load(twin, twin_state, f"{source} (as a train-form twin)", allow_nonfinite=allow_nonfinite)
            return convert_to_deploy(twin, inplace=True).state_dict()
    state = _adapt_to_partitions(state, expected, resized, source)
    if set(state) == set(expected):
        _refuse_unless_it_fits(raw, state, model, model, train_model_factory, source)
        _refuse_mismatches(expected, state, source, allow_nonfinite)
        return state
    twin, reparameterized = _matching_twin(model, state, train_model_factory)
    if not is_deploy_form(model) and twin is not None and reparameterized:
        raise ValueError(
            f"{source} holds a deploy-form (re-parameterized) checkpoint; its conv and BN branches cannot be "
            "recovered, so it loads only into a deploy-form model: build it with deploy=True "
            "(e.g. timm.create_model(name, deploy=True))."
        )
    _refuse_unless_it_fits(raw, state, model, twin, train_model_factory, source)
    if twin is None:
        return state  # the strict load lists what does not match
    _strict_load(twin, state, f"{source} (as a train-form twin)", assign=True, allow_nonfinite=allow_nonfinite)
    return convert_to_deploy(twin, inplace=True).state_dict()


def _renamed(state: dict, model: nn.Module, filter_fn: Callable[[dict, nn.Module], dict] | None) -> dict:
    """``state`` in our keys: ``filter_fn``'s renames, else those of the layout of the model's ``key_layouts`` the
    keys show."""
    if filter_fn is not None:
        return filter_fn(state, model)
    layouts = getattr(model, "key_layouts", ())
    return keys_to_ours(state, model, layouts) if layouts else state


def _matching_twin(
    model: nn.Module, state: dict[str, torch.Tensor], factory: Callable[[], nn.Module] | None
) -> tuple[nn.Module | None, bool]:
    """A train-form twin of ``model`` with the blocks re-parameterized whose train-only keys ``state`` lacks
    (innermost first), and whether any were; (None, ...) when no such twin has the file's keys."""
    factory = factory or getattr(model, "train_form_twin", None)
    if factory is None and not is_deploy_form(model):
        factory = functools.partial(copy.deepcopy, model)  # a train-form model is its own twin
    if factory is None:
        return None, False
    twin, reparameterized = _reparameterized_where_missing(_on_meta(factory), set(state))
    return (twin if set(twin.state_dict()) == set(state) else None), reparameterized


def _reparameterized_where_missing(twin: nn.Module, keys: set[str], most: bool = False) -> tuple[nn.Module, bool]:
    """``twin`` with the blocks re-parameterized (innermost first) whose train-form keys ``keys`` lacks (any of them,
    or with ``most`` more than half: a near miss's guess), in place, and whether any were."""
    reparameterized = False
    for name, module in reversed(reparameterizable(twin)):
        prefix = f"{name}." if name else ""
        own = list(module.state_dict())
        lacking = sum(prefix + k not in keys for k in own)
        if not getattr(module, "deploy", False) and lacking > (len(own) // 2 if most else 0):
            module.reparameterize()
            reparameterized = True
    return twin, reparameterized


def _refuse_unless_it_fits(
    raw: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    model: nn.Module,
    target: nn.Module | None,
    factory: Callable[[], nn.Module] | None,
    source: str,
) -> None:
    """For a model whose family lists its ``key_layouts``: a ValueError naming the closest layout unless ``state``
    (``raw`` renamed) has exactly the keys and shapes of ``target`` (the model, or the twin it loads through)."""
    if not getattr(model, "key_layouts", None):
        return
    if target is None or any(_mismatches(_shapes(target), state)):
        raise ValueError(_no_layout_matches(raw, model, factory, source))


def _no_layout_matches(
    state: dict[str, torch.Tensor], model: nn.Module, factory: Callable[[], nn.Module] | None, source: str
) -> str:
    """The error for a file that fits ``model`` in none of its family's ``key_layouts``: each layout's rename of the
    file is compared with the model's form, the train form and the (partly) re-parameterized form its keys suggest
    (twins built on the meta device), and the closest comparison's mismatches are named."""
    factory = factory or getattr(model, "train_form_twin", None)
    forms = [_shapes(model)] + ([_shapes(_on_meta(factory))] if factory is not None else [])
    closest = None
    for layout in model.key_layouts:
        renamed = layout.to_ours(dict(state), model)
        candidates = forms
        if factory is not None:
            twin, _ = _reparameterized_where_missing(_on_meta(factory), set(renamed), most=True)
            candidates = [*forms, _shapes(twin)]
        for expected in candidates:
            found = _mismatches(expected, renamed)
            if closest is None or sum(map(len, found)) < sum(map(len, closest[1])):
                closest = layout.name, found
    tried = ", ".join(layout.name for layout in model.key_layouts)
    return _mismatch_text(source, *closest[1]) + (
        f" (keys in our names; the file read as {closest[0]}, the closest of the layouts tried: {tried})"
    )


def _mismatches(expected: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """Keys ``state`` lacks, keys it has in excess, and 'key: file (shape) vs model (shape)' for the others."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in state and state[k].shape != expected[k]
    ]
    return missing, unexpected, shapes


def _check_dtypes(state: dict, expected: dict, source: str) -> None:
    """Refuse integer or complex tensors for float parameters; note lower-precision floats (any float file loads
    into a model of any float dtype)."""
    for kind, wrong in (("complex", torch.Tensor.is_complex), ("integer", lambda v: not v.is_floating_point())):
        keys = [k for k, v in state.items() if k in expected and expected[k].is_floating_point() and wrong(v)]
        if keys:
            raise ValueError(
                f"{source}: {kind} tensors for float parameters (the file was saved with the wrong dtype): "
                f"{_show(keys)}, e.g. {state[keys[0]].dtype}"
            )
    floats = [
        k for k, v in state.items() if k in expected and v.is_floating_point() and expected[k].is_floating_point()
    ]
    lower = [k for k in floats if torch.finfo(state[k].dtype).bits < torch.finfo(expected[k].dtype).bits]
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
    cfg = getattr(model, "pretrained_cfg", None) or {}
    state = dict(state)
    conv = f"{cfg['first_conv']}.weight" if cfg.get("first_conv") else None
    if conv in state and conv in expected and state[conv].dim() == 4 and expected[conv].dim() == 4:
        theirs, ours = state[conv].shape[1], expected[conv].shape[1]
        if theirs != ours and state[conv].shape[0] == expected[conv].shape[0]:
            if "in_chans" not in asked:
                raise ValueError(
                    f"{source} holds a stem for {theirs} input channels, the model takes {ours}: pass "
                    f"in_chans={theirs} to load it as trained (or in_chans={ours} explicitly to adapt the stem)"
                )
            state[conv] = adapt_input_conv(ours, state[conv], base_chans=theirs)
            _logger.warning("%s: in_chans=%d asked: the stem %s adapted from %d channels", source, ours, conv, theirs)
    classifier = cfg.get("classifier")
    if classifier:
        ours = {k: v for k, v in expected.items() if k.startswith(classifier + ".")}
        theirs = [k for k in state if k.startswith(classifier + ".")]
        fits_elsewhere = any(k in expected for k in state if k not in theirs)  # else: another layout, listed later
        if fits_elsewhere and {k: state[k].shape for k in theirs} != _shapes(ours):
            weight = state.get(f"{classifier}.weight")
            classes = weight.shape[0] if weight is not None and weight.dim() else 0
            if "num_classes" not in asked:
                held = f"a classifier for {classes} classes" if classes else "no classifier"
                raise ValueError(
                    f"{source} holds {held}, the model has {model.num_classes} classes: pass "
                    f"num_classes={classes} to load it as trained (or another num_classes explicitly for a "
                    "fresh classifier)"
                )
            state = {k: v for k, v in state.items() if k not in theirs} | ours
            _logger.warning(
                "%s: num_classes=%s asked: a fresh classifier replaces the file's (%d classes)",
                source,
                model.num_classes,
                classes,
            )
    return state


def _resized_children(state: dict, model: nn.Module, expected: dict) -> list[str]:
    """Key prefixes of the children whose shape depends on the number of partitions (a block's
    ``partition_dependent``: the RepMLP v1 global perceptron, fc1/fc2 over C * hp * wp) where ``state`` differs
    from the model: weights trained at another input size (another grid, or no global perceptron at one partition)."""
    prefixes = [
        f"{name}.{child}." if name else f"{child}."
        for name, m in model.named_modules()
        for child in getattr(m, "partition_dependent", ())
    ]

    def fc_shapes(tensors: dict, prefix: str) -> dict:  # fc1/fc2 only: a deploy-form file has no BN there
        return {k: v.shape for k, v in tensors.items() if k.startswith((prefix + "fc1.", prefix + "fc2."))}

    if not set(state) & set(expected):
        return []  # another layout altogether (the strict load lists it), not another grid
    return [p for p in prefixes if fc_shapes(state, p) != fc_shapes(expected, p)]


def _adapt_to_partitions(state: dict, expected: dict, resized: list[str], source: str) -> dict:
    """Under each of the ``resized`` prefixes, the model's freshly initialised fc1/fc2 stay (the paper's recipe,
    v1 Sec. 4.4), the BN loads from the file where both have it, and keys the model lacks are dropped; everything
    else loads as it is (any other mismatch stays an error of the strict load)."""
    if not resized:
        return state
    state = dict(state)
    for prefix in resized:
        ours = {k: v for k, v in expected.items() if k.startswith(prefix)}
        for key in [k for k in state if k.startswith(prefix)]:
            fc = key[len(prefix) :].split(".")[0] in ("fc1", "fc2")
            if fc or key not in ours or state[key].shape != ours[key].shape:
                del state[key]
        state.update({k: v for k, v in ours.items() if k not in state})
    _logger.warning(
        "%s: trained at another number of partitions; %d global perceptrons keep their fresh fc1/fc2: %s",
        source,
        len(resized),
        _show([p.rstrip(".") for p in resized]),
    )
    return state


def _shapes(state: dict[str, torch.Tensor] | nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in (state.state_dict() if isinstance(state, nn.Module) else state).items()}


def _show(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") + "]"


def _on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """A train-form twin from ``factory``, its tensors on the meta device: the file's weights are then assigned to it
    (``_strict_load(..., assign=True)``) instead of first initialising weights only to overwrite them (seconds for
    a full-size RepMLP-ResNet). Converting and comparing structures work on meta tensors alike."""
    with torch.device("meta"):
        return factory()


def _mismatch_text(source: str, missing: list, unexpected: list, shapes: list) -> str:
    return (
        f"{source} does not match the model: missing keys {_show(missing)}, unexpected keys {_show(unexpected)}, "
        f"shape mismatches {_show(shapes)}"
    )


def _refuse_mismatches(expected: dict, state: dict[str, torch.Tensor], source: str, allow_nonfinite: bool) -> None:
    """A ValueError naming every missing and unexpected key and every shape that differs, if any; then, unless
    ``allow_nonfinite``, every tensor with NaN or Inf (read only once keys and shapes are known to fit)."""
    found = _mismatches(_shapes(expected), state)
    if any(found):
        raise ValueError(_mismatch_text(source, *found))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad and not allow_nonfinite:
        raise ValueError(
            f"{source}: NaN or Inf values in {_show(bad)} (pass allow_nonfinite=True to load "
            "them anyway, e.g. to debug a diverged run)"
        )


def _strict_load(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False, allow_nonfinite: bool = True
) -> None:
    """``model.load_state_dict(state, strict=True)``, refused with every mismatch named (and, unless
    ``allow_nonfinite``, NaN or Inf) before a value is copied. ``assign``: the model's tensors become ``state``'s, in
    the model's dtypes (for a twin built by :func:`_on_meta`)."""
    expected = model.state_dict()
    _refuse_mismatches(expected, state, source, allow_nonfinite)
    if assign:  # the file's tensors themselves (conversion writes new tensors), in the twin's dtypes
        state = {k: v.to(dtype=expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)
