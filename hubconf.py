"""torch.hub entry points: every model of the zoo, one per timm name, built by ``timm.create_model``.

    model = torch.hub.load("path/to/repmlp", "repmlp_fmnist_mlp", source="local", pretrained=True)

The entry points are generated from timm's registry, so they are the zoo (``timm.list_models('repmlp*')``) and
nothing else; their keyword arguments are ``timm.create_model``'s (``num_classes``, ``deploy``, ...), and each has
its model's docstring (``torch.hub.list`` and ``torch.hub.help`` read GitHub repositories only).
"""

import timm as _timm

import repmlp as _repmlp  # registers the zoo with timm

dependencies = ["torch", "timm", "safetensors"]


def _entry_point(name: str):
    """The hub entry point of the registered model ``name``."""

    def entry_point(pretrained: bool = False, tag: str | None = None, **kwargs):
        return _timm.create_model(f"{name}.{tag}" if tag else name, pretrained=pretrained, **kwargs)

    tags = [n.partition(".")[2] for n in _timm.list_pretrained(f"{name}.*")]
    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (
        f"{_timm.models.model_entrypoint(name).__doc__}\n\n"
        f"``timm.create_model('{name}', pretrained=pretrained, **kwargs)`` (repmlp {_repmlp.__version__}).\n\n"
        "Args:\n"
        "    pretrained: load the registered weights of the tag (timm's default tag without one).\n"
        f"    tag: the weights' tag: {', '.join(tags) if tags else 'none are registered for this model'}.\n"
        "    **kwargs: timm.create_model's (num_classes, in_chans, deploy=True for the deploy form, ...).\n"
    )
    return entry_point


globals().update({_name: _entry_point(_name) for _name in _timm.list_models("repmlp*")})
