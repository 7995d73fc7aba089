"""What a training run reports: progress while it runs, and its history afterwards."""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import Split

COLUMNS = ("epoch", "train_loss", "val_loss", "val_psnr", "val_ssim", "lr", "seconds")


@dataclass(frozen=True)
class Progress:
    """Passed to the ``callback`` after every step (``event="step"``) and epoch (``"epoch"``).

    ``loss`` is the step's training loss, or the epoch's mean training loss.
    After an epoch, ``record`` holds its row of the history and ``history``
    the whole history so far (earlier runs included when resumed); both are
    ``None`` after a step. Epochs and steps count from 1.
    """

    event: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    lr: float
    record: dict[str, float] | None = None
    history: History | None = None


@dataclass
class History:
    """Per-epoch metrics of a run, and which weights were kept.

    ``records`` has one dict per epoch with the keys in ``COLUMNS``;
    ``history["val_psnr"]`` gives one column as a list. ``initial`` holds
    the validation metrics of the starting weights, ``best_epoch`` the epoch
    whose weights were kept (0: the starting weights were never beaten).
    """

    records: list[dict[str, float]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    stopped: bool = False
    split: Split | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: str) -> list[float]:
        if key not in COLUMNS:
            raise KeyError(f"no column {key!r} in the history; columns are {', '.join(COLUMNS)}")
        return [r[key] for r in self.records]

    @property
    def best(self) -> dict[str, float]:
        """The metrics of the kept weights."""
        if self.best_epoch == 0:
            return dict(self.initial)
        return dict(self.records[self.best_epoch - 1])

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """The records as CSV text; also written to ``path`` (replacing it atomically) if given."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in self.records:
            writer.writerow({k: r[k] for k in COLUMNS})
        text = buf.getvalue()
        if path is not None:
            from ..model.checkpoint import atomic_write

            atomic_write(Path(path), text.encode())
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "initial": self.initial,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "stopped": self.stopped,
            "split": self.split.to_dict() if self.split else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        split = Split(**d["split"]) if d.get("split") else None
        return cls(
            [dict(r) for r in d["records"]], dict(d["initial"]), int(d["best_epoch"]),
            float(d["best_val_loss"]), bool(d["stopped"]), split,
        )
