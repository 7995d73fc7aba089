"""What an image file declares, checked before anything is allocated.

A file of a few bytes can declare a dataset of terabytes: its header gives
a shape and a type, and a reader that trusts them allocates the whole array
(or napari one frame of it) and is killed. Every reader therefore compares
the declared size with

- the bytes the file holds for it: uncompressed data must be all there;
  compressed data may be at most :data:`MAX_RATIO` times larger than what
  is stored (deflate cannot do better than about 1000:1);
- the memory available: one frame (the plane napari shows) must fit in
  half of it, and data read at once must fit in :data:`MEMORY_SHARE` of it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import ImageFileError

MAX_RATIO = 2000
# Small data are never refused for their ratio: headers, padding and fill values.
SLACK_BYTES = 1 << 20
MEMORY_SHARE = 0.8


def available_memory() -> int:
    """Bytes of memory this process can still get."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - without psutil the check is skipped rather than wrong
        return 1 << 62


def size_text(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_declared(
    path: Any, what: str, shape: tuple[int, ...], dtype: Any, stored: int, file_size: int, *,
    compressed: bool, load: bool,
) -> None:
    """Refuse ``what`` in ``path`` (declared ``shape`` x ``dtype``) if it cannot be in the file
    (``stored`` bytes of it, ``file_size`` in all) or cannot fit in memory (``load``: read at once)."""
    itemsize = np.dtype(dtype).itemsize
    declared = math.prod(int(n) for n in shape) * itemsize
    if declared == 0:
        return
    declares = f"{what} declares {' x '.join(map(str, shape))} {np.dtype(dtype).name} values ({size_text(declared)})"
    if compressed:
        if declared > MAX_RATIO * max(stored, 0) + SLACK_BYTES:
            raise ImageFileError(f"{path}: {declares} but the file holds only {size_text(stored)} of its data; "
                                 "refusing it as damaged or not real data")
    elif declared > file_size + SLACK_BYTES and stored < declared:
        raise ImageFileError(f"{path}: {declares} but the file has only {size_text(file_size)}; "
                             "it is truncated or damaged")
    available = available_memory()
    frame = math.prod(int(n) for n in shape[-2:]) * itemsize
    if frame > available // 2:
        raise ImageFileError(f"{path}: {declares}; one frame alone needs {size_text(frame)}, more than the "
                             f"{size_text(available)} of memory available")
    if load and declared > available * MEMORY_SHARE:
        raise ImageFileError(f"{path}: {declares}, more than the {size_text(available)} of memory available")


__all__ = ["MAX_RATIO", "available_memory", "check_declared", "size_text"]
