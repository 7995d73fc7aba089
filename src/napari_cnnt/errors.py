"""The errors a user can fix, one family per concern.

Every message is one line that names the file (or the setting) and the
problem. The command line and the widgets catch exactly these families and
show the message; any other exception reaching them is a bug in napari-cnnt.
All are ``ValueError`` subclasses, so callers that catch ``ValueError`` keep
working.
"""

from __future__ import annotations

from typing import Any


def one_line(text: Any) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


class InputError(ValueError):
    """Something the user gave (a file, a setting, an option) cannot be used; the message says why."""

    def __init__(self, message: Any = "", *args: Any):
        super().__init__(one_line(message), *args)


class ImageFileError(InputError):
    """An image file that cannot be read or written."""


class CheckpointError(InputError):
    """A model file that cannot be read, used or written."""


class TrainingSettingsError(InputError):
    """Training settings that cannot work with these data or on this machine."""


class DataError(InputError):
    """Image values that cannot be denoised or trained on (NaN, infinity, a range float32 cannot hold)."""


class UsageError(InputError):
    """A command-line option or argument that cannot be used."""


__all__ = [
    "CheckpointError", "DataError", "ImageFileError", "InputError", "TrainingSettingsError", "UsageError", "one_line",
]
