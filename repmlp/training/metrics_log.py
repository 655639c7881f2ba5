"""Per-epoch metrics as JSON lines, and a PNG of the loss and accuracy curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..guards import atomic_write


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per epoch, epochs numbered from 1) and ``metrics.png`` in an output
    directory."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.plot_path = Path(output_dir) / "metrics.png"

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, epochs_done: int) -> None:
        """Keep the records of the first ``epochs_done`` epochs (numbered from 1); a resumed run writes the others
        again."""
        kept = [r for r in self.records() if r["epoch"] <= epochs_done]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.plot()

    def plot(self) -> None:
        """Loss (train, val) and accuracy (train, val top-1, EMA top-1) against epoch."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        if not records:
            return
        epochs = [r["epoch"] for r in records]  # from 1, as metrics.jsonl and the printed lines
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        for ax, keys, title in (
            (ax_loss, ("train_loss", "val_loss"), "loss"),
            (ax_acc, ("train_top1", "val_top1", "ema_val_top1"), "accuracy (%)"),
        ):
            for key in keys:
                if key in records[0]:
                    ax.plot(epochs, [r[key] for r in records], marker="o", label=key)
            ax.set_xlabel("epoch"), ax.set_title(title), ax.grid(alpha=0.3), ax.legend()
        fig.tight_layout()
        atomic_write(self.plot_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
