"""Reading and writing image stacks (HDF5, TIFF) without napari.

Readers return :class:`Image` records: the pixel data (a numpy array, or a
lazy array backed by the open file when the data is large), the axis letters
and the physical pixel size per axis. Writers never modify a file in place and
never replace a file unless asked (``overwrite=True``): see :mod:`.atomic`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ImageFileError
from .atomic import atomic_path, check_output, same_file, source_files

# Arrays larger than this many bytes are returned lazily (backed by the file).
LAZY_BYTES = 256 * 2**20


@dataclass
class Image:
    """One image stack read from a file.

    ``axes`` has one letter per dimension of ``data``: ``T`` time, ``Z``,
    ``C`` channel, ``Y``, ``X``, ``S`` colour samples, other letters as found.
    ``scale`` is the size of one step along each axis, in ``unit`` for the
    spatial axes (``metadata["time_unit"]`` for ``T`` when known).
    """

    data: Any
    name: str
    axes: str
    scale: tuple[float, ...] = ()
    unit: str | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ndim = len(self.data.shape)
        if len(self.axes) != ndim:
            raise ValueError(f"{self.name}: axes {self.axes!r} do not match the {ndim}-D data")
        if not self.scale:
            self.scale = (1.0,) * ndim
        self.scale = tuple(float(s) for s in self.scale)
        if len(self.scale) != ndim:
            raise ValueError(f"{self.name}: scale {self.scale} does not match the {ndim}-D data")

    @property
    def is_lazy(self) -> bool:
        """True when ``data`` is read from the file on access rather than held in memory."""
        return not isinstance(self.data, np.ndarray) or isinstance(self.data, np.memmap)


def default_axes(ndim: int) -> str:
    """Axes assumed when a file names none: a 3-D stack is a time-lapse (CNNT's ``[T, H, W]``)."""
    return {1: "X", 2: "YX", 3: "TYX", 4: "TZYX", 5: "TZCYX"}.get(ndim, "Q" * (ndim - 5) + "TZCYX")


def normalize_unit(unit: Any) -> str | None:
    """Spelling-independent length unit (``micron``, ``\\u00B5m`` -> ``um``); None for pixels."""
    if unit is None:
        return None
    if isinstance(unit, bytes):
        unit = unit.decode("utf-8", "replace")
    u = str(unit).strip().replace("\\u00B5", "\u00b5").replace("\\u00b5", "\u00b5")
    low = u.lower()
    if low in ("", "pixel", "pixels", "px", "none"):
        return None
    if low in ("micron", "microns", "um", "\u00b5m", "\u03bcm", "micrometer", "micrometre"):
        return "um"
    if low in ("nanometer", "nanometre", "nm"):
        return "nm"
    if low in ("millimeter", "millimetre", "mm"):
        return "mm"
    return u


__all__ = [
    "LAZY_BYTES",
    "Image",
    "ImageFileError",
    "atomic_path",
    "check_output",
    "default_axes",
    "normalize_unit",
    "same_file",
    "source_files",
]
