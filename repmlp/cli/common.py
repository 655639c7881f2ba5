"""What several tools share: a training run's directory named where a weights file is expected."""

from __future__ import annotations

from pathlib import Path

__all__ = ["RUN_WEIGHTS", "run_weights"]

#: The weights files ``repmlp-train`` writes in its output directory, by form.
RUN_WEIGHTS = {"train": "model_train.safetensors", "deploy": "model_deploy.safetensors"}


def run_weights(path: str | Path | None, form: str | None = None) -> str | None:
    """``path`` itself, or for a directory ``repmlp-train`` wrote, its weights file of ``form`` (default: the train
    form's, else the deploy form's, as a run in QAT's fc3_bn mode writes only that).

    Raises:
        ValueError: a run directory without the file of the asked form (the message lists what it holds).
    """
    if path is None or not Path(path).is_dir():
        return None if path is None else str(path)
    folder = Path(path)
    if not any((folder / name).is_file() for name in RUN_WEIGHTS.values()):
        return str(path)  # a model folder (config.json + weights) or another directory: the loader decides
    for name in [RUN_WEIGHTS[form]] if form else list(RUN_WEIGHTS.values()):
        if (folder / name).is_file():
            return str(folder / name)
    held = sorted(p.name for p in folder.iterdir())
    raise ValueError(f"run directory {folder} holds no {RUN_WEIGHTS[form]} (it holds {held})")
