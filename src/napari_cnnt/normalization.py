"""How raw intensities are mapped to the [0, 1] range a model was trained on.

A model is only meaningful together with the scaling of its training data,
so the scaling is stored in the model file and applied by ``denoise``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import DataError

MODES = ("fixed", "percentile", "none")

# Percentiles of a huge stack are estimated from at most this many values.
_PERCENTILE_SAMPLE = 4_000_000
# The network computes in float32: intensities and their range must stay well inside it.
_FLOAT32_LIMIT = float(np.finfo(np.float32).max) / 4


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
        if not np.isfinite(sample).all():
            raise DataError("the image contains NaN or infinite values; replace them before denoising")
        lo, hi = (float(v) for v in np.percentile(sample, [self.low, self.high]))
        if not hi > lo:  # a constant image: any positive range works
            hi = lo + max(1.0, abs(lo) * 1e-3)
        return check_limits(lo, hi)


def check_limits(lo: float, hi: float) -> tuple[float, float]:
    """``(lo, hi)`` if the float32 network can work with them; a :class:`DataError` naming them otherwise."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or max(abs(lo), abs(hi), hi - lo) > _FLOAT32_LIMIT:
        raise DataError(f"intensities from {lo:.3g} to {hi:.3g} are too large for the network's 32-bit "
                        "arithmetic; rescale the image (e.g. to 16-bit) before denoising")
    return lo, hi


def _subsample(data: Any) -> np.ndarray:
    """Up to a few million values (float64) from every frame of the array, read lazily.

    Small arrays are used whole. Larger ones: every frame along the leading
    axes when there are few, an even spread of frames when there are many,
    each read with a row and column stride that keeps the total near
    :data:`_PERCENTILE_SAMPLE` (a recording that bleaches or brightens is
    represented from its first frame to its last).
    """
    shape = tuple(int(n) for n in data.shape)
    size = math.prod(shape)
    if size <= _PERCENTILE_SAMPLE or len(shape) < 3:
        if size <= _PERCENTILE_SAMPLE:
            return np.asarray(data, dtype=np.float64).reshape(-1)
        step = math.ceil(math.sqrt(size / _PERCENTILE_SAMPLE))
        return np.asarray(np.asarray(data)[..., ::step, ::step], dtype=np.float64).reshape(-1)
    per_frame = math.prod(shape[-2:])
    n_frames = size // per_frame
    frames = min(n_frames, max(1, _PERCENTILE_SAMPLE // 1024))  # at least about 1000 values per frame
    per_frame_budget = max(1, _PERCENTILE_SAMPLE // frames)
    step = max(1, math.ceil(math.sqrt(per_frame / per_frame_budget)))
    flat_index = np.unique(np.linspace(0, n_frames - 1, frames).round().astype(np.int64))
    values = [np.asarray(data[np.unravel_index(int(i), shape[:-2])][::step, ::step], dtype=np.float64).reshape(-1)
              for i in flat_index]
    return np.concatenate(values)
