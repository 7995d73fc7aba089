"""Training checkpoints: a run's resumable state in one file, read without executing code from it."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..model.checkpoint import atomic_write
from ..model.config import CNNTConfig
from ..model.denoiser import CNNTDenoiser
from ..normalization import Normalization

CHECKPOINT_FORMAT = "napari-cnnt-training"
CHECKPOINT_VERSION = 1


class CheckpointMismatch(CheckpointError):
    """A training checkpoint that belongs to another run."""


def save_training_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a resumable training state atomically (tensors and JSON text only)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write(Path(path), buf.getvalue())


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint without executing code from it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = type(e).__name__ if "weights_only" in str(e) else reason  # never torch's advice to load unsafely
        raise CheckpointError(f"{path}: not a readable napari-cnnt training checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a napari-cnnt training checkpoint")
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: written by a newer napari-cnnt (checkpoint version {state['version']})")
    return state


def load_checkpoint_model(path: str | os.PathLike, best: bool = True) -> CNNTDenoiser:
    """The model in a training checkpoint: its best weights so far, or the latest."""
    state = read_training_checkpoint(path)
    model = CNNTDenoiser(CNNTConfig.from_json(state["config"]))
    model.load_state_dict(state["best" if best else "model"])
    model.normalization = Normalization.from_dict(json.loads(state["normalization"]))
    model.metadata = json.loads(state["metadata"])
    return model.eval()
