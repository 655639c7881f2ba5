"""What every model of the zoo shares: timm's model API, the train-form twin and checkpoint loading.

No ``from __future__ import annotations`` here: FX copies ``forward``'s annotations into the graphs it traces,
and TorchScript can only script those graphs when the annotations are real types, not strings.
"""

import inspect
import os
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from urllib.parse import urlparse

import torch
from timm.layers import ClassifierHead, DropPath, to_2tuple
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices
from timm.models._input import update_model_input_size
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import records
from ..checkpoint import checkpoint_filter_fn, load_checkpoint
from ..convert import is_deploy_form
from ..layers import in_layout
from ..locations import hub_weights
from ..shipped import resolve_weights
from ..weights_file import WeightsFile

torch.fx.wrap("in_layout")  # FX leaves are per module: a layout choice made at run time, here as in layers


@torch.fx.wrap  # a leaf for FX: a layout choice made at run time, not part of the traced arithmetic
def like_input_layout(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` laid out as ``x``: contiguous (NCHW) or channels_last, as it is for any other ``x``."""
    if x.is_contiguous():
        return y.contiguous()
    if x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y


class NCHWStage(nn.Sequential):
    """A stage that runs NCHW inside a channels_last model: it turns its input contiguous (oneDNN then runs its
    convs NCHW, their kernels being stored contiguous like every weight); whoever runs the stage gets the same
    arithmetic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        for block in self:
            x = block(x)
        return x


def pretrained_cfg(family: dict, **kwargs) -> dict:
    """A timm ``pretrained_cfg``: the fields every family shares (fixed input size, stem and head names, the authors'
    repository and license), updated with the ``family``'s, then with a model's ``kwargs``."""
    return {
        "fixed_input_size": True,
        "interpolation": "bilinear",
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "license": "mit",
        "origin_url": "https://github.com/DingXiaoH/RepMLP",
        **family,
        **kwargs,
    }


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic depth rates per stage and block: rising linearly from 0 at the first block to ``drop_path_rate``
    at the last (the rule of timm's ResNet and of the stochastic depth paper)."""
    check_rate("drop_path_rate", drop_path_rate)
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [rates[start : start + depth] for start, depth in zip(starts, depths)]


def drop_path(rate: float) -> nn.Module:
    """timm's ``DropPath`` for a residual branch, or an identity for rate 0 (nothing in the module tree to run)."""
    return DropPath(rate) if rate > 0 else nn.Identity()


def check_rate(name: str, value: float, family: str | None = None, why: str = "") -> None:
    """A ValueError unless ``value`` is a probability in [0, 1); with ``family``, unless it is 0 (the family has no
    place for that regularizer, ``why``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if family is not None and value:
        raise ValueError(f"{family} takes no {name} ({why}); got {name}={value!r}, use 0")


def factory_kwargs(
    family: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.device | str | torch.dtype | None]:
    """timm's factory kwargs ``dict(device=..., dtype=...)`` that a constructor passes down to every layer; a
    TypeError unless ``dtype`` is a floating dtype (the integer buffers, BN step counts, keep theirs)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{family}: dtype must be a floating torch.dtype, got {dtype!r}")
    return dict(device=device, dtype=dtype)


class RepMLPModel(nn.Module):
    """Base of the zoo's models: ``stem`` -> ``stages`` -> ``head`` (a module with ``fc``, ``reset`` and
    ``forward(x, pre_logits)``).

    ``feature_info`` lists the feature levels: the stages' outputs, preceded by the stem's output where a family
    lists it (``module='stem'``; models with fewer than three stages do, so every model has at least three).

    A family's constructor passes its architecture arguments to ``super().__init__`` as ``init_args`` (they
    rebuild the model's train-form twin, :meth:`train_form_twin`, which is how a train-form checkpoint reaches a
    deploy-form model, and they are saved beside the weights), takes timm's factory kwargs ``device`` and ``dtype``
    (not recorded: placement is not architecture) and passes them down to every layer, and ends with
    :meth:`_init_feature_levels`.
    """

    #: The checkpoint key layouts a family's files come in (:class:`repmlp.authors.KeyLayout`, ours first): a file
    #: is renamed from the one whose marker key it holds; a file that fits none is compared with each.
    key_layouts: tuple = ()

    #: Run NHWC inside: inputs are turned channels_last, which is where oneDNN's convs and pooling and our partition
    #: copies are fastest; outputs are returned in the caller's layout. A family where it does not pay sets False.
    #: The activations' layout is the one decided here: weights stay contiguous (PyTorch's default), so
    #: ``state_dict()`` saves as it is; oneDNN reorders a kernel for each call in either layout, so channels_last
    #: kernels would gain nothing.
    channels_last: bool = True

    def __init__(self, **init_args) -> None:
        """Record the family's architecture arguments (``num_classes``, ``in_chans`` and the family's own).

        Args:
            **init_args: the family constructor's arguments, by name, without ``device`` and ``dtype``.
        """
        super().__init__()
        self.init_args = init_args
        self.num_classes = init_args.get("num_classes", 0)
        self.in_chans = init_args["in_chans"]
        self.grad_checkpointing = False
        self.channels_last = type(self).channels_last  # an instance attribute, which TorchScript reads

    def _init_feature_levels(self) -> None:
        """What the model API reads of the built model, as ints (TorchScript cannot type ``feature_info``, a list
        of dicts of mixed types): the number of feature levels and whether the stem is level 0; and the stem told
        the model's layout (the stem sets it for whoever calls it, timm's feature wrappers included)."""
        if hasattr(self.stem, "channels_last"):
            self.stem.channels_last = self.channels_last
        self.num_feature_levels = len(self.feature_info)
        self.first_stage_level = int(self.feature_info[0]["module"] == "stem")

    @property
    @torch.jit.unused  # Python-side introspection, not compiled by TorchScript
    def deploy(self) -> bool:
        """True when no training-only module is left (derived from the modules, never stored)."""
        return is_deploy_form(self)

    @property
    @torch.jit.unused
    def _model_args(self) -> dict:
        """timm's reconstruction arguments (``create_model`` records its kwargs here; ``save_for_hf`` writes them to
        ``config.json``, from which ``local-dir:`` and ``hf-hub:`` names rebuild the model), with ``deploy=True``
        for a deploy-form model however it got there (``deploy=True``, :func:`repmlp.convert_to_deploy`,
        ``timm.utils.reparameterize_model``): the form is derived from the modules, as :attr:`deploy` is."""
        args = dict(self.__dict__.get("_recorded_model_args", {}))
        if is_deploy_form(self):
            args["deploy"] = True
        return args

    @_model_args.setter
    def _model_args(self, args: dict) -> None:
        self.__dict__["_recorded_model_args"] = dict(args)

    def train_form_twin(self) -> "RepMLPModel":
        """A freshly initialised train-form model of the same architecture and classifier."""
        return type(self)(**{**self.init_args, "deploy": False})

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay: the stem, then stages (or their blocks)."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute stage activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.head.fc

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Initialise every parameter and buffer as the constructor does (e.g. after ``to_empty``): each module's
        ``reset_parameters``, the one initialisation of every layer here."""
        for module in self.modules():
            if module is not self and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with one of ``num_classes`` outputs (0 removes it), and the pooling if
        ``global_pool`` is given (None keeps it); new layers take the model's device, dtype and mode."""
        self.num_classes = self.init_args["num_classes"] = num_classes
        if global_pool is not None:
            self.init_args["global_pool"] = global_pool
        old = set(self.head.modules())
        like = next(self.parameters())
        with torch.device(like.device):
            self.head.reset(num_classes, global_pool)
        for module in self.head.modules():
            if module not in old:
                module.to(dtype=like.dtype).train(self.training)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, if it is an input the model is built for; else a ValueError naming both sizes."""
        return x

    @torch.jit.ignore
    def set_input_size(self, img_size: int | tuple[int, int] | None = None, **size_args) -> None:
        """Build the model for ``img_size`` in place (timm's contract): afterwards it equals a model created at
        that size holding the same state dict, and a refused size leaves it unchanged.

        Partitions keep their size and tile the new maps; only the parts whose shape depends on the number of
        partitions change (the RepMLP v1 global perceptron, re-initialised; see the family's ``_resize``). The
        recorded constructor arguments and timm's traits (``timm.data.resolve_input_data_config``) follow;
        ``pretrained_cfg`` describes the weights' source and is left as it is, as timm's own models do.

        Args:
            img_size: new input size (H, W) or one int for both; None keeps the current one.
            **size_args: the family's size-dependent arguments (RepMLP-ResNet and the CIFAR models:
                ``fc1_fc2_reduction``).
        """
        size = self.img_size if img_size is None else img_size
        if isinstance(size, bool) or not all(isinstance(s, int) and s > 0 for s in to_2tuple(size)):
            raise ValueError(f"{type(self).__name__}: img_size must be a positive int or (H, W), got {img_size!r}")
        size = tuple(to_2tuple(size))
        recorded = self._resize(size, **size_args)  # validates everything first, then changes the model
        self.img_size = size
        self.init_args.update(img_size=size, **recorded)
        update_model_input_size(self, size, **recorded)

    def _resize(self, size: tuple[int, int], **size_args) -> dict:
        """Rebuild what depends on the input size for ``size``, refusing before any change; returns the constructor
        arguments that changed besides ``img_size``."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages, run in the model's layout; the map is returned in the input's (NCHW for NCHW)."""
        x = self.check_input(x)
        y = self.stem(in_layout(x, self.channels_last))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            y = checkpoint_seq(self.stages, y)
        else:
            y = self.stages(y)
        return like_input_layout(y, x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stem and stages, also returning the feature levels ``indices`` (timm's semantics).

        Args:
            x: input batch.
            indices: the last n levels (int), the listed levels (negative from the end), or all (None).
            norm: accepted for timm's API; no norm sits between the last stage and the head.
            stop_early: stop after the last requested level.
            output_fmt: 'NCHW' only.
            intermediates_only: return only the levels.

        Returns:
            The levels, or (final features, levels), in the input's layout; without ``stop_early`` the final
            features are :meth:`forward_features`.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"forward_intermediates: output_fmt must be 'NCHW', got '{output_fmt}'")
        take_indices, max_index = feature_take_indices(self.num_feature_levels, indices)
        first = self.first_stage_level
        x = self.check_input(x)
        y = self.stem(in_layout(x, self.channels_last))
        intermediates = [like_input_layout(y, x)] if first and 0 in take_indices else []
        for i, stage in enumerate(self.stages):  # no slicing or break: TorchScript unrolls this loop
            if not stop_early or i + first <= max_index:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    y = checkpoint(stage, y, use_reentrant=False)
                else:
                    y = stage(y)
                if i + first in take_indices:
                    intermediates.append(like_input_layout(y, x))
        if intermediates_only:
            return intermediates
        return like_input_layout(y, x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of the feature levels ``indices``, and the head (timm's semantics).

        Returns:
            The absolute indices of the kept levels.
        """
        take_indices, max_index = feature_take_indices(self.num_feature_levels, indices)
        self.stages = self.stages[: max_index + 1 - self.first_stage_level]
        prune_end = max_index < self.num_feature_levels - 1
        if prune_end:  # features now end at the last kept level; the head is sized for the final ones
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:  # a parameter-free head that passes the features through
            self.head = ClassifierHead(self.num_features, 0, pool_type="")
            self.num_classes, self.head_hidden_size = 0, self.num_features
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The head (``pre_logits``: the pooled features before the classifier)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, path: str) -> None:
        """timm ``custom_load`` hook (``pretrained=True``): :func:`repmlp.load_checkpoint` of ours or the
        authors' file, train or deploy form; a shipped file may be named relative to the weights directory."""
        weights = path.weights if isinstance(path, _GivenState) else resolve_weights(path)
        load_checkpoint(self, weights, asked=_ASKED.get())


def build(cls: type, variant: str, pretrained: bool, feature_cfg: dict, **kwargs) -> "RepMLPModel":
    """A family's ``_create``: timm's ``build_model_with_cfg`` with the family's one ``pretrained_filter_fn``
    (:func:`repmlp.checkpoint.checkpoint_filter_fn`), the pretrained config resolved once, here, every weights file
    or ``state_dict`` sent through ``custom_load`` (:func:`_route_pretrained`), and the constructor arguments a
    ``local-dir:`` or ``hf-hub:`` folder's ``config.json`` supplied checked as a file's
    (:func:`repmlp.records.model_args`)."""
    from timm.models import build_model_with_cfg, resolve_pretrained_cfg

    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    given = overlay.pop("state_dict", None)  # not deep-copied with the config, as timm's dataclass copies would
    cfg = resolve_pretrained_cfg(variant, kwargs.pop("pretrained_cfg", None), overlay).to_dict()
    recorded = kwargs.get("pretrained_model_args")
    if recorded:  # timm read them from a folder's config.json: data, never a location
        where = f"{cfg.get('file') or cfg.get('hf_hub_id') or variant}/config.json: field 'model_args'"
        records.model_args(cls, recorded, where, form=True)
        params = inspect.signature(cls).parameters
        records.check_buildable(lambda: cls(**{k: v for k, v in kwargs.items() if k in params}), where)
    asked = {k for k in ("num_classes", "in_chans") if k in kwargs and (recorded or {}).get(k, object()) != kwargs[k]}
    if pretrained:
        _route_pretrained(variant, cfg, kwargs.get("cache_dir"), given)
    token = _ASKED.set(frozenset(asked))
    try:
        model = build_model_with_cfg(
            cls, variant, pretrained, cfg, feature_cfg=feature_cfg, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
        )
    finally:
        _ASKED.reset(token)
    if isinstance(model.pretrained_cfg.get("file"), _GivenState):
        model.pretrained_cfg["file"] = None  # loaded; the config describes no file
    return model


class _GivenState:
    """A ``state_dict`` given in ``pretrained_cfg_overlay``, carried as the config's ``file`` to ``load_pretrained``
    (timm copies its configs deeply; this one is passed on as it is)."""

    def __init__(self, state: dict) -> None:
        self.weights = WeightsFile(Path("the state_dict of pretrained_cfg_overlay"), {}, state)

    def __deepcopy__(self, memo: dict) -> "_GivenState":
        return self


#: The constructor arguments the caller of the ``create_model`` in progress gave (``num_classes``, ``in_chans``):
#: timm's loader calls ``load_pretrained(path)`` with the path alone, and only these may give a file's trained
#: classifier or stem a fresh one (:func:`repmlp.checkpoint.load_checkpoint`'s ``asked``).
_ASKED: ContextVar[frozenset] = ContextVar("repmlp_asked", default=frozenset())


def _route_pretrained(variant: str, cfg: dict, cache_dir: str | None, given: dict | None = None) -> None:
    """Send a ``pretrained=True`` load through the model's ``load_pretrained`` (our :func:`load_checkpoint`): set
    ``cfg`` (resolved) to ``custom_load`` from one local ``file`` (or the ``given`` state dict).

    Why ``custom_load`` and not timm's loader (one place for it): timm's reads the whole file before the filter can
    judge it, defaults a trainer's checkpoint to its EMA weights (our documented default is its state dict), and
    replaces a classifier by comparing with ``pretrained_cfg['num_classes']`` rather than the file's own tensors (a
    given state dict too: it would drop a 3-class head loaded with ``num_classes=3``, and give a stem it cannot adapt
    a random one).

    A ``local-dir:`` folder and an ``hf-hub:`` model's weights file (found in, offline only read from, the Hugging
    Face cache: :func:`repmlp.locations.hub_weights`) load as files; a ``url`` loads from timm's cache, downloaded
    there unless offline. Locations a folder's ``config.json`` names besides its own are not used. A model with no
    weights configured is refused (timm would silently keep the random init).
    """
    if given is not None:
        cfg.update(file=_GivenState(given), custom_load=True, source="file")
        return
    from_folder = cfg.get("source") in ("local-dir", "hf-hub")  # the cfg came from a config.json
    hub = cfg.get("hf_hub_id") if cfg.get("source") == "hf-hub" or not (cfg.get("file") or cfg.get("url")) else None
    if not (cfg.get("file") or cfg.get("url") or hub):
        raise ValueError(
            f"{variant}: no weights are shipped for this model; pass a file with "
            f"pretrained_cfg_overlay=dict(file=PATH) (ours or the authors' .pth/.safetensors)"
        )
    if from_folder:
        cfg.update(url=None, state_dict=None, hf_hub_filename=None)
    if hub:
        cfg["file"] = str(hub_weights(hub, None if from_folder else cfg.get("hf_hub_filename"), cache_dir))
    elif not cfg.get("file"):
        cfg["file"] = _cached_url(cfg["url"], cache_dir)
    cfg.update(custom_load=True, source="file")


def _cached_url(url: str, cache_dir: str | None) -> str:
    """The file of ``url`` in timm's cache, downloaded there when it is not (unless offline); a FileNotFoundError
    naming the URL and the file to place otherwise."""
    from timm.models._hub import download_cached_file, get_cache_dir

    cached = Path(cache_dir or get_cache_dir()) / Path(urlparse(url).path).name
    if cached.is_file():
        return str(cached)
    why = "offline (HF_HUB_OFFLINE=1)"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "false", "no", ""):
        try:
            return download_cached_file(url, cache_dir=cache_dir)
        except OSError as err:  # URLError, HTTPError, no space: all OSErrors
            why = f"the download failed ({err})"
    raise FileNotFoundError(f"weights not in the cache and {why}: download {url} and place it as {cached}")
