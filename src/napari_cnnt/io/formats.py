"""The file formats napari-cnnt reads and writes, by name and by content: the one home of their suffixes.

Each format is known by its suffixes (what a name promises) and by its
signature (what the bytes are). Readers and the command line ask this module,
so a new format, or a new suffix, is added in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Format:
    """``name``: ``"tiff"`` or ``"hdf5"``; ``suffixes`` in lower case, compound ones (``.ome.tif``) first;
    ``usual`` the ones messages suggest."""

    name: str
    title: str
    suffixes: tuple[str, ...]
    usual: tuple[str, ...]
    module: str

    def _io(self) -> Any:
        import importlib

        return importlib.import_module(f"napari_cnnt.io.{self.module}")

    def sniff(self, path: PathLike) -> bool:
        """Whether the file's first bytes are this format's signature."""
        return self._io().is_tiff(path) if self.name == "tiff" else self._io().is_hdf5(path)

    def read(self, path: PathLike, **kwargs: Any) -> list:
        """Every image in the file, as :class:`~napari_cnnt.io.Image` records."""
        return self._io().read_tiff(path) if self.name == "tiff" else self._io().read_hdf5(path, **kwargs)


TIFF = Format("tiff", "TIFF", (".ome.tiff", ".ome.tif", ".tiff", ".tif"), (".tif", ".tiff"), "tiff")
HDF5 = Format("hdf5", "HDF5", (".hdf5", ".h5", ".hdf", ".he5"), (".h5", ".hdf5"), "hdf5")
FORMATS = (TIFF, HDF5)


def by_name(path: PathLike) -> Format | None:
    """The format a file's name promises (its suffix, in any case), or None."""
    name = os.fspath(path).lower()
    return next((f for f in FORMATS if name.endswith(f.suffixes)), None)


def by_content(path: PathLike) -> Format | None:
    """The format a file's first bytes show, whatever its name, or None (also for a missing file)."""
    return next((f for f in FORMATS if f.sniff(path)), None)


def split_suffix(path: PathLike) -> tuple[str, str]:
    """``("cells", ".ome.tif")`` for ``cells.ome.tif``: the name without its format suffix, and that suffix."""
    name = Path(path).name
    fmt = by_name(name)
    if fmt is None:
        return name, ""
    suffix = next(s for s in fmt.suffixes if name.lower().endswith(s))
    return name[: -len(suffix)], name[-len(suffix):]


def usual_suffixes() -> str:
    """``.tif/.tiff or .h5/.hdf5``, for messages."""
    return " or ".join("/".join(f.usual) for f in FORMATS)
