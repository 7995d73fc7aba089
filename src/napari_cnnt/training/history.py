"""What a training run reports: progress while it runs, and its history afterwards."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import Split
from .settings import VALIDATION_KEYS

COLUMNS = ("epoch", "train_loss", *VALIDATION_KEYS, "lr", "seconds")
METRIC_NAMES = {"val_loss": "loss", "val_psnr": "PSNR", "val_ssim": "SSIM",
                "val_interlaced_loss": "in-between-frame loss", "val_masked_loss": "masked-pixel loss"}


@dataclass(frozen=True)
class Progress:
    """Passed to the ``callback`` after every step (``event="step"``) and epoch (``"epoch"``).

    ``loss`` is the step's training loss, or the epoch's mean training loss.
    After an epoch, ``record`` holds its row of the history and ``history``
    the whole history so far (earlier runs included when resumed); both are
    ``None`` after a step. Epochs and steps count from 1. ``elapsed`` is the
    seconds this run has trained so far and ``remaining`` an estimate of the
    seconds left, from the pace of the steps so far (``None`` before the
    first step has been timed).
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
    elapsed: float = 0.0
    remaining: float | None = None


@dataclass
class History:
    """Per-epoch metrics of a run, and which weights were kept.

    ``records`` has one dict per epoch with the keys in ``COLUMNS`` (metrics
    that need truth are NaN without it; the self-supervised scores,
    ``val_interlaced_loss`` and ``val_masked_loss``, are NaN where not measured);
    ``history["val_psnr"]`` gives one column as a list. ``initial`` holds
    the validation metrics of the starting weights, ``best_epoch`` the epoch
    whose weights were kept (0: the starting weights were never beaten),
    selected by the ``metric`` column (``best_score`` its value).
    ``stopped``: ended by a stop request; ``early``: ended before the last
    epoch because the metric stopped improving. ``notes`` are the things
    the run chose or changed for itself (patch sizes fitted to the data, ...).
    """

    records: list[dict[str, float]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    best_score: float = math.nan
    stopped: bool = False
    split: Split | None = None
    metric: str = "val_loss"
    early: bool = False
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: str) -> list[float]:
        if key not in COLUMNS:
            raise KeyError(f"no column {key!r} in the history; columns are {', '.join(COLUMNS)}")
        return [r.get(key, math.nan) for r in self.records]

    @property
    def best(self) -> dict[str, float]:
        """The metrics of the kept weights."""
        if self.best_epoch == 0:
            return dict(self.initial)
        return dict(self.records[self.best_epoch - 1])

    def last_progress(self, improves: Callable[[float, float], bool]) -> int:
        """The last epoch that ``improves`` on the starting weights and every earlier epoch (0:
        none), by the metric alone: what patience counts from, even while an epoch is not yet
        good enough to replace the starting weights (``TrainSettings.min_gain``)."""
        best, last = self.initial.get(self.metric, math.nan), 0
        for epoch, record in enumerate(self.records, start=1):
            score = record.get(self.metric, math.nan)
            if math.isnan(best) or improves(score, best):
                best, last = score, epoch
        return last

    @property
    def kept_start(self) -> bool:
        """True when validation found no epoch better than the starting weights."""
        return bool(self.initial) and self.best_epoch == 0

    def summary(self) -> str:
        """One sentence on what was kept, e.g. "kept the starting model: validation PSNR did not improve"."""
        name = METRIC_NAMES.get(self.metric, self.metric)
        if not self.initial:
            return f"kept the weights of epoch {self.best_epoch} (no validation)"
        if self.best_epoch == 0 and not self.records:
            return "kept the starting model: no epoch was finished"
        if self.best_epoch == 0:
            return f"kept the starting model: validation {name} did not improve"
        start, best = self.initial.get(self.metric, math.nan), self.best.get(self.metric, math.nan)
        change = best - start
        if self.metric == "val_psnr":
            detail = f"{start:.2f} -> {best:.2f} dB ({change:+.2f} dB)"
        else:
            detail = f"{start:.4g} -> {best:.4g}"
        return f"kept epoch {self.best_epoch}: validation {name} {detail}"

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """The records as CSV text; also written to ``path`` (replacing it atomically) if given."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in self.records:
            writer.writerow({k: r.get(k, math.nan) for k in COLUMNS})
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
            "best_score": self.best_score,
            "stopped": self.stopped,
            "split": self.split.to_dict() if self.split else None,
            "metric": self.metric,
            "early": self.early,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        split = Split(**d["split"]) if d.get("split") else None
        score = d.get("best_score", d.get("best_val_loss", math.nan))  # older checkpoints: the loss
        return cls(
            [dict(r) for r in d["records"]], dict(d["initial"]), int(d["best_epoch"]),
            float(score), bool(d["stopped"]), split, d.get("metric", "val_loss"), bool(d.get("early", False)),
            list(d.get("notes", [])),
        )
