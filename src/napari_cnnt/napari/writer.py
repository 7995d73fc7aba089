"""npe2 writers: an image layer to TIFF, image layers to HDF5, and a noisy/clean
pair of layers to a CNNT training file (the data fine-tuning reads).

napari calls a writer for the path its save dialog chose, after that dialog
confirmed replacing an existing file, so the writers replace files
(``overwrite=True``); the file a layer is read from is still never written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..io import Image, ImageFileError, default_axes, hdf5, normalize_unit, tiff
from . import LayerData


class LayerWriteError(RuntimeError):
    """Why layers could not be saved.

    Not a ValueError: napari takes a ValueError from a writer to mean "no
    writer found" and drops the message.
    """


@contextlib.contextmanager
def _reporting() -> Iterator[None]:
    try:
        yield
    except ValueError as e:
        raise LayerWriteError(str(e)) from e


def _axes(data: Any, meta: dict) -> str:
    """Axis letters from the layer's labels, else from the file it was read from, else by rank."""
    ndim = len(data.shape) - (1 if meta.get("rgb") else 0)
    labels = [str(a).upper() for a in meta.get("axis_labels") or ()]
    axes = "".join(labels)
    if len(labels) != ndim or len(axes) != ndim or len(set(axes)) != ndim or not axes.isalpha():
        axes = str((meta.get("metadata") or {}).get("axes", ""))
        if len(axes) != ndim:
            axes = default_axes(ndim)
    return axes + ("S" if meta.get("rgb") else "")


def _unit(meta: dict, axes: str) -> str | None:
    """The layer's unit of the X axis (napari keeps one per axis)."""
    units = list(meta.get("units") or ())
    if "X" in axes and len(units) > axes.index("X"):
        return normalize_unit(str(units[axes.index("X")]))
    return None


def layer_image(data: Any, meta: dict) -> Image:
    axes = _axes(data, meta)
    scale = tuple(meta.get("scale") or ()) + ((1.0,) if meta.get("rgb") else ())
    name = str(meta.get("name") or "image")
    return Image(data, name, axes, scale, _unit(meta, axes), dict(meta.get("metadata") or {}))


def write_tiff(path: str, data: Any, meta: dict) -> list[str]:
    with _reporting():
        im = layer_image(data, meta)
        tiff.write_tiff(path, im.data, axes=im.axes, scale=im.scale, unit=im.unit, overwrite=True)
    return [path]


def write_hdf5(path: str, layer_data: list[LayerData]) -> list[str]:
    """One dataset per layer, named after the layer (``a/b`` makes a group ``a``)."""
    with _reporting():
        images = [layer_image(data, meta) for data, meta, _ in layer_data]
        for im in images:
            im.name = "/".join(part for part in im.name.split("/") if part) or "image"
        hdf5.write_images_hdf5(path, images, overwrite=True)
    return [path]


def _role(meta: dict) -> str | None:
    role = (meta.get("metadata") or {}).get("role")
    if role in ("noisy", "clean"):
        return role
    name = str(meta.get("name", "")).lower()
    hits = [r for r in ("noisy", "clean") if r in name]
    return hits[0] if len(hits) == 1 else None


def training_pairs(layer_data: list[LayerData]) -> tuple[list[tuple[Any, Any]], list[str] | None]:
    """Pair layers by the sample and role our reader records, or by "noisy"/"clean"
    in the names of two layers, or else take two layers as noisy then clean.
    """
    metas = [meta.get("metadata") or {} for _, meta, _ in layer_data]
    if len(layer_data) > 2 or all("sample" in m and "role" in m for m in metas):
        samples: dict[str, dict[str, Any]] = {}
        for (data, _, _), m in zip(layer_data, metas):
            if "sample" not in m or m.get("role") not in ("noisy", "clean"):
                raise ImageFileError("to save several training pairs, every layer must come from a sample of a "
                                     "CNNT training file; save one noisy and one clean layer at a time instead")
            samples.setdefault(str(m["sample"]), {})[m["role"]] = data
        for name, pair in samples.items():
            if set(pair) != {"noisy", "clean"}:
                raise ImageFileError(f"sample {name!r} needs both a noisy and a clean layer")
        return [(p["noisy"], p["clean"]) for p in samples.values()], list(samples)
    if len(layer_data) != 2:
        raise ImageFileError("a CNNT training pair needs two image layers: noisy and clean")
    (a, meta_a, _), (b, meta_b, _) = layer_data
    if (_role(meta_a), _role(meta_b)) == ("clean", "noisy"):
        a, b = b, a
    return [(a, b)], None


def write_training_pairs(path: str, layer_data: list[LayerData]) -> list[str]:
    with _reporting():
        pairs, names = training_pairs(layer_data)
        hdf5.write_training_pairs(path, pairs, names, overwrite=True)
    return [path]
