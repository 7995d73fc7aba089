"""TIFF files: ImageJ hyperstacks, OME-TIFF, plain multi-page and BigTIFF.

tifffile does the decoding; this module turns its series into
:class:`~napari_cnnt.io.Image` records with axes and pixel sizes, and keeps
large files on disk (memory-mapped when the pixels are stored contiguously,
otherwise as a zarr view of the file that decodes on access). What a file
declares is checked against its bytes and the memory before any pixel is
read (:mod:`.limits`).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .. import io as cnnt_io
from . import Image, ImageFileError, default_axes, normalize_unit
from .atomic import atomic_path
from .limits import check_declared

MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)
IMAGEJ_AXES = "TZCYXS"
# Above this, ImageJ's 32-bit offsets do not reach; such data is written as OME BigTIFF.
_CLASSIC_TIFF_BYTES = 2**32 - 2**25

# What tifffile raises for files that are damaged or not what they claim.
_READ_ERRORS = (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError, struct.error, zlib.error,
                EOFError, RuntimeError)

_TO_UM = {"nm": 1e-3, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def is_tiff(path: str | os.PathLike) -> bool:
    """True when the file starts with a TIFF or BigTIFF header."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in MAGIC
    except OSError:
        return False


def _stem(path: Path) -> str:
    from .formats import split_suffix

    stem, suffix = split_suffix(path)
    return stem if suffix else path.stem


def _axes(series: tifffile.TiffPageSeries) -> str:
    """tifffile's axes with its generic letters resolved: a plain page sequence
    (``I``/``Q``) is read as time, the axis CNNT denoises along; samples that are
    not an RGB(A) colour axis are channels.
    """
    axes = list(series.axes)
    if len(axes) != len(series.shape):
        return default_axes(len(series.shape))
    for i, a in enumerate(axes):
        if a in "IQ":
            free = [c for c in "TZ" if c not in axes]
            if free:
                axes[i] = free[0]
        elif a == "S" and not (i == len(axes) - 1 and series.shape[i] in (3, 4)) and "C" not in axes:
            axes[i] = "C"
    return "".join(axes)


def _ome_pixels(tif: tifffile.TiffFile, index: int) -> dict[str, Any]:
    if not tif.is_ome or not tif.ome_metadata:
        return {}
    try:
        images = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    except (KeyError, ValueError, TypeError):
        return {}
    if isinstance(images, dict):
        images = [images]
    if index >= len(images):
        return {}
    return images[index].get("Pixels", {}) or {}


def _length_to(value: float, unit: str | None, target: str | None) -> float:
    """Convert a length between units where both are known; otherwise keep it."""
    if unit == target or unit not in _TO_UM or target not in _TO_UM:
        return value
    return value * _TO_UM[unit] / _TO_UM[target]


def _shaped_scale(tif: tifffile.TiffFile, index: int, axes: str) -> tuple[tuple[float, ...], Any] | None:
    """Scale stored by :func:`write_tiff` in tifffile's JSON description."""
    shaped = tif.shaped_metadata if tif.is_shaped else None
    if not shaped or index >= len(shaped):
        return None
    scale = shaped[index].get("scale")
    if not isinstance(scale, list) or len(scale) != len(axes):
        return None
    try:
        return tuple(float(s) for s in scale), shaped[index].get("unit")
    except (TypeError, ValueError):
        return None


def _scale(tif: tifffile.TiffFile, series: tifffile.TiffPageSeries, index: int, axes: str):
    """Scale per axis, the length unit and extra metadata (time unit, channel names)."""
    sizes: dict[str, float] = {}
    meta: dict[str, Any] = {}
    unit: str | None = None
    pixels = _ome_pixels(tif, index)
    if pixels:
        unit = normalize_unit(pixels.get("PhysicalSizeXUnit", "\u00b5m"))
        for a in "XYZ":
            if f"PhysicalSize{a}" in pixels:
                a_unit = normalize_unit(pixels.get(f"PhysicalSize{a}Unit", "\u00b5m"))
                sizes[a] = _length_to(float(pixels[f"PhysicalSize{a}"]), a_unit, unit)
        if "TimeIncrement" in pixels:
            sizes["T"] = float(pixels["TimeIncrement"])
            meta["time_unit"] = pixels.get("TimeIncrementUnit", "s")
        channels = pixels.get("Channel", [])
        channels = [channels] if isinstance(channels, dict) else channels
        names = [c.get("Name") for c in channels if isinstance(c, dict)]
        if names and all(names):
            meta["channel_names"] = [str(n) for n in names]
    elif (shaped := _shaped_scale(tif, index, axes)) is not None:
        return shaped[0], normalize_unit(shaped[1]), meta
    else:
        page = series.keyframe
        try:
            xres, yres = (float(r) for r in page.resolution)
        except (TypeError, ValueError, ZeroDivisionError):
            xres = yres = 1.0
        ij = tif.imagej_metadata if tif.is_imagej else None
        if ij:
            unit = normalize_unit(ij.get("unit"))
            if ij.get("spacing"):
                sizes["Z"] = float(ij["spacing"])
            if ij.get("finterval"):
                sizes["T"] = float(ij["finterval"])
                meta["time_unit"] = {"sec": "s"}.get(ij.get("tunit", "sec"), ij.get("tunit"))
        elif page.resolutionunit == tifffile.RESUNIT.CENTIMETER:
            unit = "um"
            xres, yres = xres / 1e4, yres / 1e4
        else:
            # No unit, or inches: inch resolutions are print settings (72 dpi), not pixel sizes.
            xres = yres = 1.0
        if xres > 0 and yres > 0 and (xres, yres) != (1.0, 1.0):
            sizes["X"], sizes["Y"] = 1.0 / xres, 1.0 / yres
    scale = tuple(sizes.get(a, 1.0) if sizes.get(a, 0) > 0 else 1.0 for a in axes)
    return scale, unit, meta


def _lazy(path: Path, tif: tifffile.TiffFile, series: tifffile.TiffPageSeries, index: int) -> Any:
    """A memory map when the pixels are contiguous and uncompressed, else a zarr view; None if neither."""
    if series.dataoffset is not None:
        data = tifffile.memmap(path, series=index, mode="r")
        return data.reshape(series.shape) if data.shape != series.shape else data
    try:
        import zarr
    except ImportError:
        return None
    return zarr.open(series.aszarr(level=0), mode="r")


class _DamageLog(logging.Handler):
    """Collects what tifffile logs (instead of raising) when a file ends too early."""

    SIGNS = ("invalid page offset", "invalid value offset", "corrupted file")

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(sign in message for sign in self.SIGNS):
            self.messages.append(message)


def _check_complete(path: Path, series: tifffile.TiffPageSeries) -> None:
    """The pixels of the first and last planes must lie inside the file."""
    size = path.stat().st_size
    ends = []
    if series.dataoffset is not None:
        ends.append(series.dataoffset + series.nbytes)
    for page in (series.pages[0], series.pages[-1]) if len(series.pages) else ():
        if page is not None and page.dataoffsets:
            ends.append(max(o + n for o, n in zip(page.dataoffsets, page.databytecounts)))
    if ends and max(ends) > size:
        raise ImageFileError(f"{path}: TIFF file is truncated (image data ends at byte {max(ends)}, "
                             f"the file has {size} bytes)")


def _check_declared(path: Path, series: tifffile.TiffPageSeries, load: bool) -> None:
    """The first plane's declared pixels against its stored bytes, and the series against the memory."""
    page = series.keyframe
    stored = sum(int(n) for n in (page.databytecounts or ()))
    compressed = int(page.compression) != 1
    size = path.stat().st_size
    check_declared(path, "the image", tuple(page.shape), series.dtype, stored, size, compressed=compressed,
                   load=False)
    check_declared(path, "the image", tuple(series.shape), series.dtype, size, size, compressed=True, load=load)


def read_tiff(path: str | os.PathLike, lazy_bytes: int | None = None) -> list[Image]:
    """One :class:`Image` per image series (usually one); series over ``lazy_bytes``
    (default :data:`~napari_cnnt.io.LAZY_BYTES`) stay on disk and are read on access.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"{path}: no such file")
    if not is_tiff(path):
        raise ImageFileError(f"{path}: not a TIFF file (no TIFF header)")
    threshold = cnnt_io.LAZY_BYTES if lazy_bytes is None else lazy_bytes
    damage = _DamageLog()
    tifffile_log = logging.getLogger("tifffile")
    tifffile_log.addHandler(damage)
    try:
        tif = tifffile.TiffFile(path)
        all_series = [s for s in tif.series if len(s.shape) >= 2 and 0 not in s.shape]
    except _READ_ERRORS as e:
        raise ImageFileError(f"{path}: TIFF file is truncated or corrupt ({e})") from None
    finally:
        tifffile_log.removeHandler(damage)
    images: list[Image] = []
    keep_open = False
    try:
        if damage.messages:
            raise ImageFileError(f"{path}: TIFF file is truncated or corrupt ({damage.messages[0]})")
        if not all_series:
            raise ImageFileError(f"{path}: TIFF file holds no readable image")
        for index, series in enumerate(tif.series):
            if series not in all_series:
                continue
            _check_complete(path, series)
            _check_declared(path, series, load=series.nbytes <= threshold)
            axes = _axes(series)
            scale, unit, meta = _scale(tif, series, index, axes)
            data = None
            if series.nbytes > threshold:
                data = _lazy(path, tif, series, index)
                keep_open |= data is not None and not isinstance(data, np.memmap)
            if data is None:
                data = series.asarray()
            name = _stem(path) if len(all_series) == 1 else f"{_stem(path)} [{series.name or index}]"
            meta.update(source=os.fspath(path), series=index, tiff_axes=series.axes)
            images.append(Image(data, name, axes, scale, unit, meta))
    except ImageFileError:
        tif.close()
        raise
    except _READ_ERRORS as e:
        tif.close()
        raise ImageFileError(f"{path}: TIFF file is truncated or corrupt ({e})") from None
    except MemoryError:
        tif.close()
        raise ImageFileError(f"{path}: not enough memory to read the image") from None
    if not keep_open:
        tif.close()
    return images


def _imagej_ok(data: Any, axes: str) -> bool:
    dtype = np.dtype(data.dtype)
    if not any(dtype == d for d in IMAGEJ_DTYPES) or not set(axes) <= set(IMAGEJ_AXES):
        return False
    if "S" in axes and not (axes.endswith("S") and data.shape[-1] in (3, 4) and dtype == np.uint8):
        return False
    return dtype.itemsize * int(np.prod(data.shape)) < _CLASSIC_TIFF_BYTES


def _pages(data: Any, axes: str, order: str) -> Iterator[np.ndarray]:
    """The planes of ``data`` (axes ``axes``) in the axis order ``order``, one at a time."""
    plane = "YXS" if order.endswith("S") else "YX"
    lead = order[: len(order) - len(plane)]
    for idx in np.ndindex(*(data.shape[axes.index(a)] for a in lead)):
        key: list[Any] = [slice(None)] * len(axes)
        for a, i in zip(lead, idx):
            key[axes.index(a)] = i
        page = np.asarray(data[tuple(key)])
        have = [a for a in axes if a in plane]
        yield np.ascontiguousarray(np.transpose(page, [have.index(a) for a in plane]))


def _in_order(data: Any, axes: str, order: str) -> Any:
    """``data`` rearranged to ``order``: an array if it is in memory, else a page iterator."""
    if isinstance(data, np.ndarray) and not isinstance(data, np.memmap):
        return np.transpose(data, [axes.index(a) for a in order])
    return _pages(data, axes, order)


def write_tiff(
    path: str | os.PathLike,
    data: Any,
    axes: str = "TYX",
    scale: Sequence[float] | None = None,
    unit: str | None = "um",
    compression: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``data`` as an ImageJ hyperstack where ImageJ can hold it (uint8, uint16
    or float32; axes from ``TZCYXS``; under 4 GB), else as OME-TIFF (BigTIFF when large).

    ``scale`` gives the step per axis (``unit`` for X, Y, Z; seconds for T).
    Lazy arrays are written plane by plane. Replaces an existing ``path`` only
    if ``overwrite`` (atomically; never the file ``data`` is read from).
    """
    shape = tuple(data.shape)
    axes = axes.upper()
    if len(axes) != len(shape) or len(set(axes)) != len(axes):
        raise ImageFileError(f"{path}: axes {axes!r} do not fit data of shape {shape}")
    if not ("Y" in axes and "X" in axes):
        raise ImageFileError(f"{path}: axes {axes!r} need a Y and an X axis")
    size = dict(zip(axes, scale or (1.0,) * len(axes)))
    unit = normalize_unit(unit)
    dtype = np.dtype(data.dtype)
    with atomic_path(path, overwrite=overwrite, inputs=[data]) as tmp:
        if _imagej_ok(data, axes):
            order = "".join(a for a in IMAGEJ_AXES if a in axes)
            metadata: dict[str, Any] = {"axes": order}
            if unit:
                metadata["unit"] = "micron" if unit == "um" else unit
            if size.get("Z", 1.0) != 1.0:
                metadata["spacing"] = size["Z"]
            if size.get("T", 1.0) != 1.0:
                metadata["finterval"] = size["T"]
            tifffile.imwrite(
                tmp, _in_order(data, axes, order), shape=tuple(shape[axes.index(a)] for a in order), dtype=dtype,
                imagej=True, resolution=(1.0 / size.get("X", 1.0), 1.0 / size.get("Y", 1.0)),
                metadata=metadata, compression=compression, photometric="rgb" if "S" in axes else "minisblack",
            )
            return
        ome = set(axes) <= set("TCZYXS")
        if ome:
            order = "".join(a for a in "TCZYXS" if a in axes)
        else:  # plain TIFF; tifffile keeps the axes in its own metadata
            order = "".join(a for a in axes if a not in "YXS") + "YX" + ("S" if "S" in axes else "")
        metadata = {"axes": order}
        if ome:
            for a in "XYZ":
                if a in size:
                    metadata[f"PhysicalSize{a}"] = size[a]
                    if unit:
                        metadata[f"PhysicalSize{a}Unit"] = "\u00b5m" if unit == "um" else unit
            if "T" in size:
                metadata["TimeIncrement"] = size["T"]
        else:  # tifffile's JSON description holds any keys; read back by _scale
            metadata.update(scale=[size.get(a, 1.0) for a in order], unit=unit)
        nbytes = dtype.itemsize * int(np.prod(shape))
        tifffile.imwrite(
            tmp, _in_order(data, axes, order), shape=tuple(shape[axes.index(a)] for a in order), dtype=dtype,
            ome=ome, metadata=metadata, compression=compression, bigtiff=nbytes >= _CLASSIC_TIFF_BYTES,
            photometric="rgb" if order.endswith("S") and shape[-1] in (3, 4) else "minisblack",
        )


__all__ = ["is_tiff", "read_tiff", "write_tiff"]
