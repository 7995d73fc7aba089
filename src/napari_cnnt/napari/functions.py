"""Denoising as a plain function ``image -> image``, for napari's function-based tools and for scripts.

:func:`denoise_image` takes the data of an image layer (``napari.types.ImageData``)
and returns the denoised data; npe2 lists it as the command
``napari-cnnt.denoise_image``, so workflow tools and scripts can call it by
name. The *Denoise (function)* widget is generated from the same signature
(``widgets/function.py``) and runs it on a worker thread.

This module imports no Qt; the annotations are real types (no postponed
evaluation) because magicgui builds the widget from them.
"""

import functools
import os
from pathlib import Path

from napari.types import ImageData

OVERLAP = 0.25  # the share of a tile that overlaps its neighbours, as ``denoise`` uses by default


def denoise_image(
    image: ImageData,
    model: Path | None = None,
    time_axis: int = 0,
    tile_frames: int = 0,
    tile_size: int = 0,
    overlap: float = OVERLAP,
    batch_size: int = 0,
    device: str = "auto",
    fast_path: bool = True,
) -> ImageData:
    """Denoise ``image`` with CNNT; returns a float32 array of its shape, in its units.

    Parameters
    ----------
    image
        A ``[T, Y, X]`` time-lapse, a ``[Y, X]`` frame, or more axes with
        ``time_axis`` saying which one is time (the others are denoised one
        by one).
    model
        A napari-cnnt model file, a reference checkpoint or a bioimage.io
        package; empty or ``None``: the bundled model.
    time_axis
        Which axis is time (ignored for a single frame).
    tile_frames, tile_size
        Frames and pixels (height and width) of a tile; 0 chooses them for
        the model, the stack and the device's memory.
    overlap
        The share of a tile that overlaps its neighbours along each axis.
    batch_size
        Tiles per network call; 0 fits the device's memory.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    fast_path
        Use bfloat16 where the hardware computes it natively; off: float32.
    """
    from ..inference import auto_tile, denoise
    from ..runtime import Runtime

    if image is None:
        raise ValueError("choose an image to denoise")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be a share of the tile from 0 to below 1, got {overlap}")
    net = _model(model)
    runtime = Runtime.create(device, None if fast_path else False)
    shape = tuple(int(n) for n in image.shape)
    axis = None if len(shape) < 3 else time_axis
    stack = ((1 if axis is None else shape[axis]),) + shape[-2:]
    auto = auto_tile(net.config, stack, runtime)
    tile = (tile_frames or auto[0], tile_size or auto[1], tile_size or auto[2])
    return denoise(
        image, net, tile=tile, overlap=tuple(int(c * overlap) for c in tile), batch_size=batch_size or None,
        device=runtime, time_axis=axis,
    )


def _model(path: Path | None):
    if path is None or str(path) in ("", "."):
        return _cached_model(None, 0)
    path = Path(path).expanduser().resolve()
    return _cached_model(path, os.stat(path).st_mtime_ns if path.exists() else 0)


@functools.lru_cache(maxsize=4)
def _cached_model(path: Path | None, mtime: int):
    """Models by path and modification time, so that a workflow run frame by frame loads each once."""
    from ..model.checkpoint import load_model

    return load_model(path)
