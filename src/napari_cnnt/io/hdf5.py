"""HDF5 files: any image datasets, and CNNT's training layout.

The training layout (the reference implementation's): one group per sample,
each holding ``noisy_im`` and ``clean_im`` arrays ``[T, H, W]`` or ``[H, W]``.

Pixel sizes are read from the attributes instruments and Fiji write
(``element_size_um`` and similar), axes from ``axes``, ilastik's
``axistags`` or HDF5 dimension labels.

Only data inside the file are read: datasets whose storage is in another
file (external storage, virtual datasets over other files, external links)
are refused unless ``allow_external=True``. What a dataset declares (its
shape and type) is checked against the bytes the file holds and the memory
available before anything is read (:mod:`.limits`).

Writes are checked by reading the file back: HDF5 reports some failed
writes only when a dataset is freed, after the file closed "successfully".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import h5py
import numpy as np

from .. import io as cnnt_io
from . import Image, ImageFileError, default_axes, normalize_unit
from .atomic import atomic_path, check_room, os_reason, same_file
from .limits import check_declared

SIGNATURE = b"\x89HDF\r\n\x1a\n"
NOISY, CLEAN = "noisy_im", "clean_im"

# Attributes giving the size of one element per axis; the ``_um`` ones (and
# ``element_size``, by Fiji's convention) are in micrometres unless a unit
# attribute says otherwise.
_SCALE_ATTRS = ("element_size_um", "element_size", "voxel_size_um", "voxel_size", "pixel_size_um",
                "pixel_size", "spacing", "scale")
_UNIT_ATTRS = ("unit", "units", "element_size_unit")


def is_hdf5(path: str | os.PathLike) -> bool:
    """True when the file starts with the HDF5 signature (also after a user block)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            offset = 0
            while offset + len(SIGNATURE) <= size:
                f.seek(offset)
                if f.read(len(SIGNATURE)) == SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False
    return False


def open_file(path: str | os.PathLike) -> h5py.File:
    """Open for reading, with a message that names the file and the problem."""
    if not os.path.isfile(path):
        raise ImageFileError(f"{path}: no such file")
    if not is_hdf5(path):
        raise ImageFileError(f"{path}: not an HDF5 file (no HDF5 signature)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        problem = "truncated" if "truncated" in str(e) else "corrupt or unreadable"
        raise ImageFileError(f"{path}: HDF5 file is {problem} ({e})") from None


def _is_image(obj: Any) -> bool:
    """Numeric, at least 2-D, and at least two axes longer than 3 (not a table of rows)."""
    if not isinstance(obj, h5py.Dataset) or obj.dtype.kind not in "biuf" or obj.ndim < 2:
        return False
    return sum(n > 3 for n in obj.shape) >= 2


def _walk(group: h5py.Group, prefix: str = "", allow_external: bool = False) -> Iterator[tuple[str, h5py.Dataset]]:
    """Image datasets in file order, a sample's ``noisy_im`` before its ``clean_im``."""
    names = list(group.keys())
    if NOISY in names and CLEAN in names:
        names.remove(NOISY)
        names.insert(names.index(CLEAN), NOISY)
    for name in names:
        try:
            if not allow_external and isinstance(group.get(name, getlink=True), h5py.ExternalLink):
                continue
            obj = group[name]
        except (KeyError, OSError):  # dangling or external link
            continue
        if isinstance(obj, h5py.Group):
            yield from _walk(obj, f"{prefix}{name}/", allow_external)
        elif _is_image(obj):
            yield f"{prefix}{name}", obj


def list_image_datasets(path: str | os.PathLike, allow_external: bool = False) -> list[str]:
    """Paths of the image-like datasets, in the order :func:`read_hdf5` returns them."""
    with open_file(path) as f:
        return [key for key, _ in _walk(f, allow_external=allow_external)]


def check_storage(ds: h5py.Dataset, path: Any, key: str, allow_external: bool = False) -> None:
    """Refuse a dataset whose data live outside ``path`` (unless ``allow_external``)."""
    if allow_external:
        return
    try:
        external = ds.external
        virtual = ds.is_virtual
        sources = {src.file_name for src in ds.virtual_sources()} if virtual else set()
    except (OSError, RuntimeError, ValueError) as e:
        raise ImageFileError(f"{path}: dataset {key!r} has unreadable storage information ({e})") from None
    if external:
        names = ", ".join(str(name) for name, *_ in external)
        raise ImageFileError(f"{path}: dataset {key!r} keeps its data in other files ({names}); refusing to "
                             "read data that are not in this file")
    others = [name for name in sources if name not in (".", "") and not same_file(name, path)]
    if others:
        raise ImageFileError(f"{path}: dataset {key!r} is a virtual dataset over other files "
                             f"({', '.join(sorted(others))}); refusing to read data that are not in this file")


def _stored_bytes(ds: h5py.Dataset) -> int:
    try:
        return int(ds.id.get_storage_size())
    except (OSError, RuntimeError, ValueError):
        return 0


def _check(ds: h5py.Dataset, path: Any, key: str, allow_external: bool, load: bool) -> None:
    """What the dataset declares must be in the file, and fit in memory."""
    check_storage(ds, path, key, allow_external)
    compressed = ds.chunks is not None and bool(ds.compression or ds._filters)
    check_declared(path, f"dataset {key!r}", tuple(ds.shape), ds.dtype, _stored_bytes(ds),
                   os.path.getsize(path), compressed=compressed, load=load)


def _attr(ds: h5py.Dataset, names: Sequence[str]) -> tuple[str | None, Any]:
    """The first of ``names`` set on the dataset, else on its group."""
    for obj in (ds, ds.parent):
        for name in names:
            if name in obj.attrs:
                return name, obj.attrs[name]
    return None, None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        return _text(value.reshape(()).item())
    return str(value)


def _axes(ds: h5py.Dataset) -> str:
    _, value = _attr(ds, ("axes", "axis_labels", "dimension_order", "DimensionOrder"))
    if value is not None:
        if isinstance(value, np.ndarray) and value.size == ds.ndim:
            axes = "".join(_text(v)[:1] for v in value.ravel())
        else:
            axes = _text(value)
        axes = axes.upper()
        if len(axes) == ds.ndim and len(set(axes)) == ds.ndim:
            return axes
    if "axistags" in ds.attrs:  # ilastik / vigra
        try:
            tags = json.loads(_text(ds.attrs["axistags"]))["axes"]
            axes = "".join(t["key"] for t in tags).upper()
            if len(axes) == ds.ndim:
                return axes
        except (ValueError, KeyError, TypeError):
            pass
    labels = "".join((d.label or "?")[:1].upper() for d in ds.dims)
    if "?" not in labels and len(set(labels)) == ds.ndim:
        return labels
    return default_axes(ds.ndim)


def _scale(ds: h5py.Dataset) -> tuple[tuple[float, ...], str | None]:
    """Scale per axis; a shorter list of sizes applies to the last axes."""
    name, value = _attr(ds, _SCALE_ATTRS)
    scale = [1.0] * ds.ndim
    if value is None:
        return tuple(scale), None
    try:
        sizes = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=float))]
    except (TypeError, ValueError):
        return tuple(scale), None
    if not 0 < len(sizes) <= ds.ndim or not all(np.isfinite(s) and s > 0 for s in sizes):
        return tuple(scale), None
    scale[ds.ndim - len(sizes):] = sizes
    _, unit = _attr(ds, _UNIT_ATTRS)
    if unit is not None:
        return tuple(scale), normalize_unit(_text(unit))
    return tuple(scale), "um" if name.endswith("_um") or name == "element_size" else None


def _image(ds: h5py.Dataset, key: str, lazy_bytes: int | None, path: Any, allow_external: bool = False) -> Image:
    scale, unit = _scale(ds)
    metadata: dict[str, Any] = {"source": os.fspath(path), "key": key}
    parts = key.rsplit("/", 1)
    if len(parts) == 2 and parts[1] in (NOISY, CLEAN):
        metadata["sample"] = parts[0]
        metadata["role"] = "noisy" if parts[1] == NOISY else "clean"
    threshold = cnnt_io.LAZY_BYTES if lazy_bytes is None else lazy_bytes
    lazy = math.prod(ds.shape) * ds.dtype.itemsize > threshold
    _check(ds, path, key, allow_external, load=not lazy)
    if lazy:
        data: Any = ds
    else:
        try:
            data = ds[()]
        except OSError as e:
            raise ImageFileError(f"{path}: dataset {key!r} cannot be read, the file may be corrupt ({e})") from None
    return Image(data, key, _axes(ds), scale, unit, metadata)


def read_dataset(path: str | os.PathLike, key: str, allow_external: bool = False) -> Image:
    """One dataset as an :class:`Image` whose ``data`` is the open ``h5py.Dataset`` (read on access)."""
    f = open_file(path)
    try:
        link = f.get(key, getlink=True)
        if isinstance(link, h5py.ExternalLink) and not allow_external:
            raise ImageFileError(f"{path}: dataset {key!r} is a link to another file ({link.filename}); refusing to "
                                 "read data that are not in this file")
        ds = f.get(key)
        if not isinstance(ds, h5py.Dataset):
            raise ImageFileError(f"{path}: no dataset {key!r}")
        if ds.dtype.kind not in "biuf":
            raise ImageFileError(f"{path}: dataset {key!r} holds {ds.dtype} values, not numbers")
        return _image(ds, key.strip("/"), 0, path, allow_external)
    except (BaseException) as e:
        f.close()
        if isinstance(e, (OSError, KeyError)):
            raise ImageFileError(f"{path}: dataset {key!r} cannot be read ({' '.join(str(e).split())})") from None
        raise


def read_hdf5(path: str | os.PathLike, lazy_bytes: int | None = None, allow_external: bool = False) -> list[Image]:
    """Every image-like dataset, in file order; datasets over ``lazy_bytes``
    (default :data:`~napari_cnnt.io.LAZY_BYTES`) stay in the file and are read on access.
    """
    f = open_file(path)
    try:
        images = [_image(ds, key, lazy_bytes, path, allow_external)
                  for key, ds in _walk(f, allow_external=allow_external)]
    except BaseException:
        f.close()
        raise
    if not any(isinstance(im.data, h5py.Dataset) for im in images):
        f.close()
    return images


def is_training_file(path: str | os.PathLike) -> bool:
    """True when every top-level member is a group holding ``noisy_im`` or ``clean_im``."""
    with open_file(path) as f:
        members = list(f.values())
        return bool(members) and all(
            isinstance(g, h5py.Group) and (NOISY in g or CLEAN in g) for g in members
        )


def read_training_pairs(
    path: str | os.PathLike, allow_external: bool = False,
) -> list[tuple[str, h5py.Dataset, h5py.Dataset]]:
    """``(sample, noisy, clean)`` for every sample group, in file order; the arrays are
    open ``h5py.Dataset`` objects, read on access.
    """
    f = open_file(path)
    pairs = []
    try:
        for name, group in f.items():
            if not isinstance(group, h5py.Group):
                continue
            if NOISY not in group and CLEAN not in group:
                continue
            for part in (NOISY, CLEAN):
                if isinstance(group.get(part, getlink=True), h5py.ExternalLink) and not allow_external:
                    raise ImageFileError(f"{path}: sample {name!r}: {part} is a link to another file; refusing to "
                                         "read data that are not in this file")
                if not isinstance(group.get(part), h5py.Dataset):
                    raise ImageFileError(f"{path}: sample {name!r} has no {part!r} dataset")
            noisy, clean = group[NOISY], group[CLEAN]
            for part, ds in ((NOISY, noisy), (CLEAN, clean)):
                if ds.dtype.kind not in "biuf":
                    raise ImageFileError(f"{path}: sample {name!r}: {part} holds {ds.dtype} values, not numbers")
                _check(ds, path, f"{name}/{part}", allow_external, load=True)
            if noisy.shape != clean.shape or noisy.ndim not in (2, 3):
                raise ImageFileError(
                    f"{path}: sample {name!r} needs noisy_im and clean_im of the same shape [T, H, W] or "
                    f"[H, W], got {noisy.shape} and {clean.shape}"
                )
            pairs.append((name, noisy, clean))
        if not pairs:
            raise ImageFileError(f"{path}: no CNNT training samples (groups holding noisy_im and clean_im)")
    except BaseException:
        f.close()
        raise
    return pairs


@contextlib.contextmanager
def open_training_pairs(
    path: str | os.PathLike, allow_external: bool = False,
) -> Iterator[list[tuple[str, h5py.Dataset, h5py.Dataset]]]:
    """``with open_training_pairs(path) as pairs:`` :func:`read_training_pairs`, with the file
    closed when the block ends, so no caller has to find the file behind the datasets."""
    pairs = read_training_pairs(path, allow_external)
    try:
        yield pairs
    finally:
        pairs[0][1].file.close()


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """One frame per chunk (at most 512 x 512): fast to read frame by frame."""
    if len(shape) < 2 or 0 in shape:
        return None
    return (1,) * (len(shape) - 2) + tuple(min(n, 512) for n in shape[-2:])


def _crc(a: np.ndarray, crc: int = 0) -> int:
    """Running checksum of ``a``'s values (byte order and memory layout do not matter)."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return zlib.crc32(a.reshape(-1).view(np.uint8), crc)


# HDF5 holds up to this much written data in its chunk cache, to be flushed later.
_CHUNK_CACHE = 1 << 20


def _room(frame_bytes: int) -> int:
    """Free space to demand before writing a frame: the frame, what the cache may still flush, metadata."""
    return 2 * frame_bytes + 2 * _CHUNK_CACHE + (1 << 20)


def _write_dataset(group: h5py.Group, key: str, data: Any, attrs: dict[str, Any], path: Any = None) -> tuple:
    """Copy ``data`` frame by frame along its first axis, so lazy sources are never loaded whole.

    Returns what the file must give back: shape, data type and checksum.
    """
    shape = tuple(data.shape)
    dtype = np.dtype(data.dtype)
    if dtype.kind not in "biuf":
        raise ImageFileError(f"cannot write {key!r}: data type {dtype} is not numeric")
    ds = group.create_dataset(
        key, shape=shape, dtype=dtype, chunks=_chunks(shape), compression="gzip", compression_opts=4,
        shuffle=len(shape) >= 2,
    )
    crc = 0
    target = path if path is not None else group.file.filename  # named in messages; in the same folder
    if len(shape) <= 2:
        values = np.asarray(data, dtype=dtype)
        check_room(target, _room(values.nbytes))
        ds[...] = values
        crc = _crc(values)
    else:
        for i in range(shape[0]):
            frame = np.asarray(data[i], dtype=dtype)
            check_room(target, _room(frame.nbytes))
            ds[i] = frame
            crc = _crc(frame, crc)
    for name, value in attrs.items():
        if value is not None:
            ds.attrs[name] = value
    return shape, dtype, crc


def _verify(path: Any, tmp: Any, expected: dict[str, tuple]) -> None:
    """Read every written dataset back and compare it with what was written."""
    try:
        with h5py.File(tmp, "r") as f:
            for key, (shape, dtype, crc) in expected.items():
                ds = f.get(key)
                if not isinstance(ds, h5py.Dataset) or tuple(ds.shape) != shape or ds.dtype != dtype:
                    raise ImageFileError(f"{path}: could not be written: dataset {key!r} is incomplete on disk")
                got = 0
                if len(shape) <= 2:
                    got = _crc(ds[()])
                else:
                    for i in range(shape[0]):
                        got = _crc(ds[i], got)
                if got != crc:
                    raise ImageFileError(f"{path}: could not be written: dataset {key!r} reads back differently "
                                         "(the disk may be full)")
    except OSError as e:
        raise ImageFileError(f"{path}: could not be written: the file does not read back ({e})") from None


def _write_file(path: Any, overwrite: bool, inputs: Sequence[Any], fill: Any) -> None:
    """Create the HDF5 file through :func:`~.atomic.atomic_path`: ``fill(file)`` returns what it wrote,
    which is flushed, closed and read back before the file is put in place."""
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
        f = h5py.File(tmp, "w", track_order=True)
        try:
            expected = fill(f)
            f.flush()
        except BaseException as e:
            with contextlib.suppress(Exception):  # the first error says what went wrong; closing may add others
                f.close()
            if isinstance(e, (OSError, RuntimeError)):  # HDF5 reports failed writes as either
                raise ImageFileError(f"{path}: could not be written: {os_reason(e)}") from None
            raise
        try:
            f.close()
        except (OSError, RuntimeError) as e:
            raise ImageFileError(f"{path}: could not be written: {os_reason(e)}") from None
        _verify(path, tmp, expected)


def write_images_hdf5(path: str | os.PathLike, images: Sequence[Image], overwrite: bool = False) -> None:
    """Write each image as one dataset named ``image.name`` (``/`` makes groups).

    An existing ``path`` is refused unless ``overwrite``; a file the images are read from, always.
    """
    def fill(f: h5py.File) -> dict[str, tuple]:
        expected = {}
        for im in images:
            if im.name in f:
                raise ImageFileError(f"{path}: two images named {im.name!r}")
            attrs: dict[str, Any] = {"axes": im.axes}
            scale = np.asarray(im.scale, dtype=np.float64)
            if im.unit == "um":
                attrs["element_size_um"] = scale
            elif np.any(scale != 1.0):
                attrs.update(scale=scale, unit=im.unit)
            expected[im.name] = _write_dataset(f, im.name, im.data, attrs, path)
        return expected

    _write_file(path, overwrite, [im.data for im in images], fill)


def write_hdf5(
    path: str | os.PathLike,
    key: str,
    data: Any,
    axes: str | None = None,
    scale: Sequence[float] | None = None,
    overwrite: bool = False,
) -> None:
    """Write one array as a chunked, gzip-compressed dataset with ``axes`` and
    ``element_size_um`` (``scale`` in micrometres) attributes; replaces ``path`` only if ``overwrite``.
    """
    axes = axes or default_axes(len(data.shape))
    _check_key(path, key)
    write_images_hdf5(path, [Image(data, key.strip("/"), axes, tuple(scale or ()), "um")], overwrite)


def _check_key(path: Any, key: str) -> None:
    if not key.strip("/") or any(not part for part in key.strip("/").split("/")):
        raise ImageFileError(f"{path}: invalid dataset name {key!r}")


def write_training_pairs(
    path: str | os.PathLike,
    pairs: Sequence[tuple[Any, Any]],
    names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``(noisy, clean)`` arrays in the CNNT training layout, one group per sample;
    an existing ``path`` is replaced only if ``overwrite``.

    Default sample names (``sample_000``, ...) sort in the order given, which is
    the order the reference implementation reads them in.
    """
    if not pairs:
        raise ImageFileError(f"{path}: no training pairs to write")
    if names is None:
        width = max(3, len(str(len(pairs) - 1)))
        names = [f"sample_{i:0{width}d}" for i in range(len(pairs))]
    names = [str(n).strip("/") for n in names]
    if len(names) != len(pairs) or len(set(names)) != len(names):
        raise ImageFileError(f"{path}: need one distinct name per pair, got {len(names)} for {len(pairs)} pairs")
    for name, (noisy, clean) in zip(names, pairs):
        _check_key(path, name)
        if tuple(noisy.shape) != tuple(clean.shape) or len(noisy.shape) not in (2, 3):
            raise ImageFileError(
                f"{path}: sample {name!r} needs noisy and clean arrays of the same shape [T, H, W] or [H, W], "
                f"got {tuple(noisy.shape)} and {tuple(clean.shape)}"
            )
    def fill(f: h5py.File) -> dict[str, tuple]:
        expected = {}
        for name, (noisy, clean) in zip(names, pairs):
            group = f.create_group(name, track_order=True)
            axes = default_axes(len(noisy.shape))
            expected[f"{name}/{NOISY}"] = _write_dataset(group, NOISY, noisy, {"axes": axes}, path)
            expected[f"{name}/{CLEAN}"] = _write_dataset(group, CLEAN, clean, {"axes": axes}, path)
        return expected

    _write_file(path, overwrite, [a for pair in pairs for a in pair], fill)


__all__ = [
    "is_hdf5",
    "is_training_file",
    "list_image_datasets",
    "read_dataset",
    "read_hdf5",
    "read_training_pairs",
    "write_hdf5",
    "write_images_hdf5",
    "write_training_pairs",
]
