"""npe2 reader: HDF5 and TIFF stacks as image layers.

``get_reader`` answers quickly. Names without an HDF5 or TIFF suffix (and
missing files) are left to other readers. A file with one of these suffixes
that cannot be used (empty, not HDF5/TIFF inside, damaged, no image
datasets, data that are not in the file) gets a reader that raises
:class:`~napari_cnnt.io.ImageFileError` with the reason, which napari shows;
a reader that returned None would only be reported as "refused the file".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ..io import Image, ImageFileError, formats, hdf5, tiff
from . import LayerData

# A channel axis longer than this stays a slider instead of becoming one layer per channel.
MAX_CHANNEL_LAYERS = 8

PathLike = str | os.PathLike


def _kind(path: PathLike) -> str | None:
    fmt = formats.by_name(path)
    return None if fmt is None else fmt.name


def _problem(path: PathLike) -> str | None:
    """Why a file with one of our suffixes cannot be opened, or None if it can (as far as a quick look tells)."""
    kind = _kind(path)
    if not os.path.isfile(path):
        return f"{path}: no such file"
    if os.path.getsize(path) == 0:
        return f"{path}: the file is empty"
    if kind == "tiff":
        return None if tiff.is_tiff(path) else f"{path}: not a TIFF file (no TIFF header)"
    if not hdf5.is_hdf5(path):
        return f"{path}: not an HDF5 file (no HDF5 signature)"
    try:
        if not hdf5.list_image_datasets(path):
            return (f"{path}: holds no image datasets (numeric, at least 2-D, with two axes longer than 3); "
                    "nothing to show")
    except ImageFileError as e:
        return str(e)
    return None


def _refusal(reason: str) -> Callable[..., list[LayerData]]:
    """A reader that says why it cannot read: napari shows a reader's error, but only
    "refused the file" for a reader that returns None."""

    def refuse(*_: Any, **__: Any) -> list[LayerData]:
        raise ImageFileError(reason)

    return refuse


def get_reader(path: PathLike | Sequence[PathLike]) -> Callable[..., list[LayerData]] | None:
    """Our reader for HDF5 and TIFF names; for one that cannot be used, a reader that raises the reason.

    Other names, and missing files, are left to other readers (None).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_kind(p) and os.path.exists(p) for p in paths):
        return None
    problems = [p for p in map(_problem, paths) if p]
    return _refusal(problems[0]) if problems else read_layers


def read_images(path: PathLike) -> list[Image]:
    return formats.by_name(path).read(path)


def read_layers(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [layer for p in paths for im in read_images(p) for layer in image_layer_data(im)]


def _lazy(data: Any) -> Any:
    """h5py and zarr arrays as dask arrays, which napari slices and caches lazily."""
    if type(data).__module__.startswith(("h5py", "zarr")):
        try:
            import dask.array as da
        except ImportError:
            return data
        if type(data).__module__.startswith("zarr"):
            return da.from_zarr(data)
        plane = (1,) * (data.ndim - 2) + tuple(data.shape[-2:])
        return da.from_array(data, chunks=plane, name=False)
    return data


def _axis_unit(axis: str, image: Image) -> str:
    if axis in "XYZ" and image.unit:
        return image.unit
    if axis == "T" and image.metadata.get("time_unit"):
        return str(image.metadata["time_unit"])
    return "pixel"


def image_layer_data(image: Image) -> list[LayerData]:
    """Layer data for one image: RGB(A) samples stay one layer, a short channel
    axis is split into one layer per channel (napari's ``channel_axis``).
    """
    axes, scale = image.axes, list(image.scale)
    kwargs: dict[str, Any] = {"name": image.name, "metadata": {**image.metadata, "axes": axes}}
    shape = image.data.shape
    if axes.endswith("S") and shape[-1] in (3, 4):
        kwargs["rgb"] = True
        axes, scale = axes[:-1], scale[:-1]
    units = [_axis_unit(a, image) for a in axes]
    c = axes.find("C")
    if c >= 0 and 1 < shape[c] <= MAX_CHANNEL_LAYERS and not kwargs.get("rgb"):
        n = shape[c]
        keep = [i for i in range(len(axes)) if i != c]
        names = image.metadata.get("channel_names") or [f"C{i}" for i in range(n)]
        # Per-channel lists: napari would read a bare tuple of strings as one entry per channel.
        kwargs.update(
            channel_axis=c,
            name=[f"{image.name} [{names[i] if i < len(names) else i}]" for i in range(n)],
            scale=[[scale[i] for i in keep]] * n,
            axis_labels=[[axes[i] for i in keep]] * n,
            units=[[units[i] for i in keep]] * n,
            metadata=[{**kwargs["metadata"], "channel": i} for i in range(n)],
        )
    else:
        kwargs.update(scale=scale, axis_labels=list(axes), units=units)
    return [(_lazy(image.data), kwargs, "image")]
