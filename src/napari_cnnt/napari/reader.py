"""npe2 reader: HDF5 and TIFF stacks as image layers.

``get_reader`` answers quickly and returns None for files this plugin cannot
use (wrong extension, not HDF5/TIFF inside, an HDF5 file without images), so
napari can try other readers. A file that is HDF5 or TIFF but damaged gets a
reader that raises :class:`~napari_cnnt.io.ImageFileError`, which napari shows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ..io import Image, ImageFileError, hdf5, tiff
from . import LayerData

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
TIFF_SUFFIXES = (".tif", ".tiff")
# A channel axis longer than this stays a slider instead of becoming one layer per channel.
MAX_CHANNEL_LAYERS = 8

PathLike = str | os.PathLike


def _kind(path: PathLike) -> str | None:
    name = os.fspath(path).lower()
    if name.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    return None


def _can_read(path: PathLike) -> bool:
    kind = _kind(path)
    if kind == "tiff":
        return tiff.is_tiff(path)
    if kind == "hdf5" and hdf5.is_hdf5(path):
        try:
            return bool(hdf5.list_image_datasets(path))
        except ImageFileError:
            return True  # it claims to be HDF5: the reader will say what is wrong
    return False


def get_reader(path: PathLike | Sequence[PathLike]) -> Callable[..., list[LayerData]] | None:
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_can_read(p) for p in paths):
        return None
    return read_layers


def read_images(path: PathLike) -> list[Image]:
    return hdf5.read_hdf5(path) if _kind(path) == "hdf5" else tiff.read_tiff(path)


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
