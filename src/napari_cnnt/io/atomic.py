"""Writes that cannot half-succeed, and outputs that never replace a file by accident.

Every file napari-cnnt writes (images, training files, models, checkpoints)
goes through :func:`atomic_path`: the data go to a hidden temporary file in
the target's folder; only when every write, the close and the caller's own
check of what reached the file have succeeded is the temporary file flushed
to disk and renamed over the target. On any failure (a full disk, a
permission, Ctrl-C) the temporary file is removed and an existing target is
left byte for byte as it was.

Before anything is written the target is checked: it must not be one of the
command's inputs (not even with ``overwrite``), not a folder, in a folder
that exists, and it must not exist unless ``overwrite`` is true.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ImageFileError

_OS_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is too large for this file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.EIO: "input/output error on the disk",
}


def os_reason(error: BaseException) -> str:
    """A plain sentence fragment for why a write failed (HDF5 puts the errno in its message)."""
    code = getattr(error, "errno", None)
    if code in _OS_REASONS:
        return _OS_REASONS[code]
    text = str(error)
    if "No space left" in text or "errno = 28," in text:
        return "the disk is full"
    if "requested and" in text and "written" in text:  # a short write (tifffile): almost always a full disk
        return "the disk is full (fewer bytes were written than requested)"
    return getattr(error, "strerror", None) or " ".join(text.split()) or type(error).__name__


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes the current user can still write in ``folder``'s file system (None if unknown)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def check_room(path: str | os.PathLike, needed: int, error: type = ImageFileError) -> None:
    """Refuse to go on writing ``path`` when its disk has less than ``needed`` bytes free.

    For writers whose library cannot survive a full disk (HDF5 crashes the
    process at exit after a failed write), this stops before the disk fills.
    """
    free = free_bytes(Path(path).parent)
    if free is not None and free < needed:
        raise error(f"{path}: could not be written: the disk is full ({free / 1e6:.1f} MB free, "
                    f"{needed / 1e6:.1f} MB needed to go on)")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both names reach the same file (links, ``..`` and case folding included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def source_files(data: Any) -> set[str]:
    """The files a lazy array reads from (h5py datasets, memory maps, dask graphs over them)."""
    found: set[str] = set()
    items = [data]
    dask_graph = getattr(data, "dask", None)
    if dask_graph is not None:
        with contextlib.suppress(Exception):
            items.extend(dict(dask_graph).values())
    for item in items:
        file = getattr(item, "file", None)
        name = getattr(file, "filename", None) or getattr(item, "filename", None)
        if isinstance(name, (str, os.PathLike)):
            found.add(os.fspath(name))
    return found


def _input_files(inputs: Iterable[Any]) -> list[str]:
    files: list[str] = []
    for item in inputs:
        if item is None:
            continue
        if isinstance(item, (str, os.PathLike)):
            files.append(os.fspath(item))
        else:
            files.extend(source_files(item))
    return files


def check_output(
    path: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[Any] = (), error: type = ImageFileError,
) -> Path:
    """Refuse ``path`` as an output before any work is done; see the module docstring for the rules.

    ``inputs`` are file names or arrays read lazily from files.
    """
    path = Path(path)
    for name in _input_files(inputs):
        if same_file(name, path):
            raise error(f"{path}: refusing to overwrite the input of this command; choose another output")
    if path.is_dir():
        raise error(f"{path}: is a folder, not a file name")
    if not path.parent.is_dir():
        raise error(f"{path}: the folder {path.parent} does not exist")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise error(f"{path}: already exists; choose another name or allow overwriting it (--overwrite)")
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every system can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _put_in_place(tmp: Path, path: Path, overwrite: bool, error: type) -> None:
    if path.exists():
        with contextlib.suppress(OSError):  # the new file keeps the permissions of the one it replaces
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    if overwrite:
        os.replace(tmp, path)
        return
    try:  # a hard link never replaces a file that appeared meanwhile
        os.link(tmp, path)
    except FileExistsError:
        raise error(f"{path}: already exists; choose another name or allow overwriting it (--overwrite)") from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise error(f"{path}: already exists; choose another name or allow overwriting it (--overwrite)") from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[Any] = (), error: type = ImageFileError,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; put it in place only if the ``with`` body succeeds.

    The body writes the whole file to the temporary path, closes it and
    checks it (raising on any problem). Errors of the operating system
    become ``error`` with a one-line reason naming ``path``.
    """
    path = check_output(path, overwrite=overwrite, inputs=inputs, error=error)
    # A fresh name (not mkstemp) so that the file gets the usual permissions (the umask applies).
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise error(f"{path}: nothing was written")
        _fsync(tmp)
        _put_in_place(tmp, path, overwrite, error)
        _fsync_folder(path.parent)
    except OSError as e:
        raise error(f"{path}: could not be written: {os_reason(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes(
    path: str | os.PathLike, payload: bytes, *, overwrite: bool = False, inputs: Iterable[Any] = (),
    error: type = ImageFileError,
) -> Path:
    """Write ``payload`` to ``path`` with :func:`atomic_path`, checking that every byte was written."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite, inputs=inputs, error=error) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, "no bytes written")
                view = view[written:]
        finally:
            os.close(fd)
        if tmp.stat().st_size != len(payload):
            raise error(f"{path}: could not be written: {len(payload)} bytes requested, {tmp.stat().st_size} on disk")
    return path


__all__ = [
    "atomic_path", "check_output", "check_room", "free_bytes", "os_reason", "same_file", "source_files", "write_bytes",
]
