"""One vocabulary for long calls: ``progress`` to report to, ``stop`` to end early.

``denoise``, ``finetune`` and ``train`` all take ``progress``, a callable they
report to, and ``stop``, a ``threading.Event`` or a callable that returns True
once the caller wants the call to end. What ending means is the call's own:
``denoise`` raises :class:`~napari_cnnt.inference.Cancelled` (its output is
incomplete), training returns the best weights so far.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


def stop_requested(stop: Any) -> Callable[[], bool]:
    """A function telling whether ``stop`` (None, an event with ``is_set`` or a callable) asks to end."""
    if stop is None:
        return lambda: False
    if callable(getattr(stop, "is_set", None)):
        return stop.is_set
    if callable(stop):
        return lambda: bool(stop())
    raise TypeError(f"stop must be a threading.Event (anything with is_set()) or a callable, got {type(stop).__name__}")


def check_progress(progress: Any) -> Any:
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable, got {type(progress).__name__}")
    return progress


def renamed(value: Any, old_value: Any, name: str, old_name: str, call: str) -> Any:
    """``value``, or ``old_value`` given under a parameter's former name (with a DeprecationWarning)."""
    if old_value is None:
        return value
    if value is not None:
        raise TypeError(f"{call}() got both {name}= and its former name {old_name}=; give {name}= only")
    warnings.warn(f"{call}({old_name}=...) is now {call}({name}=...)", DeprecationWarning, stacklevel=3)
    return old_value
