"""A small live chart of training and validation loss and validation PSNR per epoch.

Drawn with QPainter so that the plugin needs no plotting library: losses
share the left axis, PSNR (dB) has its own on the right. A run validated
without truth has no PSNR: the right axis shows its self-supervised loss (at
the frames in between, or at hidden pixels), whose changes are far smaller
than the training loss's level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from ...training.history import METRIC_NAMES
from ...training.settings import SELF_SUPERVISED_SCORES

SERIES = (  # (history column, legend, colour, right axis)
    ("train_loss", "train loss", "#4e9ff5", False),
    ("val_loss", "validation loss", "#f5a142", False),
    ("val_psnr", "validation PSNR (dB)", "#5fd35f", True),
)
NO_TRUTH_SERIES = {  # by the self-supervised score that was measured
    key: (("train_loss", "train loss", "#4e9ff5", False), (key, f"validation {name}", "#5fd35f", True))
    for key, name in ((k, METRIC_NAMES[k]) for k in SELF_SUPERVISED_SCORES)
}


class Axis(NamedTuple):
    """One vertical axis: its value range, its ticks ``(value, label)``, and the pixels beside
    the plot that its labels take."""

    lo: float
    hi: float
    ticks: list[tuple[float, str]]
    width: int


def _finite(records: Sequence[dict[str, float]], key: str) -> list[float]:
    return [v for v in (r.get(key, math.nan) for r in records) if math.isfinite(v)]


def _range(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad


def ticks(lo: float, hi: float, most: int = 4) -> list[tuple[float, str]]:
    """Round values inside ``[lo, hi]`` (2 to ``most`` of them where possible, 1, 2, 2.5 or 5
    times a power of ten apart) and their labels, with as many decimals as the spacing needs,
    so that neighbouring labels always differ however small the range."""
    span = hi - lo
    if not (math.isfinite(span) and span > 0):
        return [(lo, f"{lo:.3g}")]
    power = 10.0 ** math.floor(math.log10(span / most))
    candidates = []
    for step in (m * power for m in (1, 2, 2.5, 5, 10, 20, 25, 50)):
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        if last > first:
            candidates.append((step, [k * step for k in range(first, last + 1)]))
    fitting = [c for c in candidates if len(c[1]) <= most]
    step, values = fitting[0] if fitting else min(candidates, key=lambda c: len(c[1]))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(round(step, decimals) - step) > 1e-9 * step:  # 2.5 x 10^k needs one more
        decimals += 1
    return [(round(v, decimals), f"{v:.{decimals}f}") for v in values]


class LossPlot(QWidget):
    """Call :meth:`set_records` with the history records (dicts with ``COLUMNS`` keys)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.records: list[dict[str, float]] = []
        self.epochs = 1
        self.setMinimumHeight(160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def set_records(self, records: Sequence[dict[str, float]], epochs: int | None = None) -> None:
        self.records = list(records)
        if epochs is not None:
            self.epochs = max(1, int(epochs))
        self.update()

    @property
    def series(self) -> tuple[tuple[str, str, str, bool], ...]:
        """What is drawn: PSNR and the losses, or, validated without truth, the self-supervised loss."""
        if self.records and not _finite(self.records, "val_psnr"):
            for key, series in NO_TRUTH_SERIES.items():
                if _finite(self.records, key):
                    return series
        return SERIES

    def ranges(self) -> dict[bool, tuple[float, float]]:
        """The value range of the left (losses, ``False``) and the right (PSNR, ``True``) axis."""
        series = self.series
        return {side: _range([v for k, _, _, right in series if right == side for v in _finite(self.records, k)])
                for side in (False, True)}

    def axes(self) -> dict[bool, Axis]:
        """Per axis (left ``False``, right ``True``), with room for its longest label, so that a
        small loss's many decimals are not cut off."""
        fm = self.fontMetrics()
        out = {}
        for right, (lo, hi) in self.ranges().items():
            marks = ticks(lo, hi)
            out[right] = Axis(lo, hi, marks, max(fm.horizontalAdvance(text) for _, text in marks) + 8)
        return out

    def axis_widths(self) -> dict[bool, int]:
        return {right: axis.width for right, axis in self.axes().items()}

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        text = self.palette().windowText().color()
        fm = p.fontMetrics()
        axes, series = self.axes(), self.series
        left_width, right_width = axes[False].width, axes[True].width
        # Two legend entries a row where they fit in half the width each, else one a row.
        inner = self.width() - left_width - right_width
        halves = all(fm.horizontalAdvance(name) + 22 <= inner / 2 for _, name, _, _ in series)
        rows = math.ceil(len(series) / 2) if halves else len(series)
        plot = QRectF(self.rect()).adjusted(left_width, 8 + rows * fm.height(), -right_width, -fm.height() - 8)
        p.setPen(QPen(text, 1))
        p.drawRect(plot)
        n = max(self.epochs, len(self.records), 1)
        x_of = (lambda e: plot.left() + plot.width() * (e - 1) / (n - 1)) if n > 1 else (lambda e: plot.center().x())
        p.drawText(QRectF(plot.left(), plot.bottom() + 2, plot.width(), fm.height()),
                   Qt.AlignmentFlag.AlignCenter, f"epoch (of {n})")
        for right, (lo, hi, marks, width) in axes.items():
            x = plot.right() + 4 if right else 0
            edge = plot.right() if right else plot.left()
            align = Qt.AlignmentFlag.AlignLeft if right else Qt.AlignmentFlag.AlignRight
            for value, label in marks:
                y = plot.bottom() - plot.height() * (value - lo) / (hi - lo)
                p.drawLine(QPointF(edge - 3, y), QPointF(edge + 3, y))
                p.drawText(QRectF(x, y - fm.height() / 2, width - 4, fm.height()),
                           align | Qt.AlignmentFlag.AlignVCenter, label)
        legend_x = plot.left()
        for i, (key, name, colour, right) in enumerate(series):
            lo, hi = axes[right].lo, axes[right].hi
            pen = QPen(QColor(colour), 2)
            p.setPen(pen)
            row, column = (i // 2, i % 2) if halves else (i, 0)
            x0 = legend_x + column * plot.width() / 2
            y0 = 4 + row * fm.height() + fm.height() / 2
            p.drawLine(QPointF(x0, y0), QPointF(x0 + 14, y0))
            p.setPen(QPen(text))
            p.drawText(QPointF(x0 + 18, y0 + fm.ascent() / 2 - 1), name)
            p.setPen(pen)
            points = [
                QPointF(x_of(r["epoch"]), plot.bottom() - plot.height() * (r[key] - lo) / (hi - lo))
                for r in self.records if math.isfinite(r.get(key, math.nan))
            ]
            for a, b in zip(points, points[1:]):
                p.drawLine(a, b)
            for pt in points:
                p.drawEllipse(pt, 2.5, 2.5)
        p.end()
