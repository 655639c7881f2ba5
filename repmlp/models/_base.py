"""What every model of the zoo shares: timm's model API, the train-form twin and checkpoint loading."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models import checkpoint_seq
from torch import nn

from ..checkpoint import load_checkpoint
from ..convert import is_deploy_form
from ..shipped import resolve_weights


class RepMLPModel(nn.Module):
    """Base of the zoo's models: ``stem`` -> ``stages`` -> ``head`` (a module with ``fc``, ``reset`` and
    ``forward(x, pre_logits)``), built from the constructor arguments it records.

    A subclass's ``__init__`` starts with ``super().__init__(locals())``: the recorded arguments rebuild the
    model's train-form twin (:meth:`train_form_twin`), which is how a train-form checkpoint reaches a
    deploy-form model.
    """

    #: Maps a foreign (the authors') state dict to our keys; a pure rename (see :mod:`repmlp.authors`).
    checkpoint_filter_fn: Callable[[dict, nn.Module], dict] | None = None

    def __init__(self, init_args: dict) -> None:
        super().__init__()
        self.init_args = {k: v for k, v in init_args.items() if k not in ("self", "__class__")}
        self.num_classes = self.init_args.get("num_classes", 0)
        self.grad_checkpointing = False

    @property
    def deploy(self) -> bool:
        """True when no training-only module is left (derived from the modules, never stored)."""
        return is_deploy_form(self)

    def train_form_twin(self) -> RepMLPModel:
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

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with one of ``num_classes`` outputs (0 removes it), optionally the pooling."""
        self.num_classes = self.init_args["num_classes"] = num_classes
        if global_pool is not None:
            self.init_args["global_pool"] = global_pool
        self.head.reset(num_classes, global_pool)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming both sizes unless ``x`` is an input the model is built for."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages."""
        self.check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The head (``pre_logits``: the pooled features before the classifier)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, path: str) -> None:
        """timm ``custom_load`` hook (``pretrained=True``): :func:`repmlp.load_checkpoint` of ours or the
        authors' file, train or deploy form; a shipped file may be named relative to the weights directory."""
        load_checkpoint(self, resolve_weights(path))
