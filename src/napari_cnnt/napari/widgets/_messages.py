"""The words the widgets speak, without Qt: the error a control's value raises, and sentences for the user."""

from __future__ import annotations

from typing import Any

import torch

from ...model.checkpoint import CheckpointError


class UserError(ValueError):
    """A problem with the user's choices, worded for the user."""


def sentence(text: str) -> str:
    text = str(text).strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


def explain(error: BaseException, action: str, memory_hint: str) -> str:
    """A sentence for the user about why ``action`` (e.g. "Denoising") failed."""
    if is_out_of_memory(error):
        return f"{action} ran out of memory. {memory_hint}"
    if isinstance(error, CheckpointError):
        return sentence(f"This model cannot be used: {error}")
    if isinstance(error, (ValueError, TypeError, OSError, ArithmeticError)):
        return sentence(f"{action} failed: {error}")
    return sentence(f"{action} failed unexpectedly ({type(error).__name__}: {error})")


def shape_text(shape: Any) -> str:
    return " x ".join(str(int(n)) for n in shape)


def clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
