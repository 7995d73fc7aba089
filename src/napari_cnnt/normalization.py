"""How raw intensities are mapped to the [0, 1] range a model was trained on.

A model is only meaningful together with the scaling of its training data,
so the scaling is stored in the model file and applied by ``denoise``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MODES = ("fixed", "percentile", "none")

# Percentiles of a huge stack are estimated from at most this many values.
_PERCENTILE_SAMPLE = 4_000_000


@dataclass(frozen=True)
class Normalization:
    """``fixed``: ``(x - low) / (high - low)`` with fixed intensity limits;
    ``percentile``: the same with ``low``/``high`` read as percentiles of the
    data (the reference's 1.5 and 99.5); ``none``: values pass unchanged.
    """

    mode: str = "fixed"
    low: float = 0.0
    high: float = 65536.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"normalization mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        if not np.isfinite([self.low, self.high]).all() or self.high <= self.low:
            raise ValueError(f"normalization needs finite low < high, got {self.low} and {self.high}")
        if self.mode == "percentile" and not (0.0 <= self.low < self.high <= 100.0):
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}")

    @classmethod
    def none(cls) -> Normalization:
        return cls("none", 0.0, 1.0)

    @classmethod
    def reference(cls, per_scaling: bool = False, im_value_scale: Any = None) -> Normalization:
        """The reference's scaling, from its two run settings (``docs/cnnt.md`` section 7)."""
        if per_scaling:
            return cls("percentile", 1.5, 99.5)
        low, high = im_value_scale or (0.0, 65536.0)
        return cls("fixed", low, high)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        return cls(str(d["mode"]), d.get("low", 0.0), d.get("high", 1.0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def limits(self, data: Any) -> tuple[float, float]:
        """The intensities that map to 0 and 1 for this data."""
        if self.mode == "none":
            return 0.0, 1.0
        if self.mode == "fixed":
            return self.low, self.high
        sample = _subsample(data)
        lo, hi = np.percentile(sample, [self.low, self.high])
        if not hi > lo:  # a constant image: any positive range works
            hi = lo + 1.0
        return float(lo), float(hi)


def _subsample(data: Any) -> np.ndarray:
    """Up to a few million values spread over the whole array, read lazily."""
    shape = data.shape
    size = int(np.prod(shape))
    if size <= _PERCENTILE_SAMPLE or len(shape) < 3:
        return np.asarray(data, dtype=np.float32)
    # Whole frames spread evenly along the leading axes keep reads contiguous.
    per_frame = int(np.prod(shape[-2:]))
    n_frames = size // per_frame
    take = max(1, _PERCENTILE_SAMPLE // per_frame)
    flat_index = np.unique(np.linspace(0, n_frames - 1, min(take, n_frames)).astype(int))
    frames = [np.asarray(data[np.unravel_index(i, shape[:-2])], dtype=np.float32) for i in flat_index]
    return np.stack(frames)
