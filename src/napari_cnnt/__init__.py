"""napari-cnnt: denoise fluorescence time-lapses with CNNT, in napari or from scripts.

The public API is small and imports no Qt::

    import napari_cnnt
    model = napari_cnnt.load_model()            # the bundled backbone
    clean = napari_cnnt.denoise(stack, model)   # [T, H, W] -> [T, H, W]
    tuned, history = napari_cnnt.finetune(model, [(noisy, clean)])

Heavy modules (torch) load on first use, so napari starts quickly.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

if sys.platform.startswith("linux"):
    # Back PyTorch's large CPU tensors with transparent huge pages. Without it
    # every activation larger than glibc's mmap threshold (32 MB at most) is
    # fresh memory, zeroed page by page on first touch: measured here, that
    # costs float32 inference and fine-tuning a third of their time. PyTorch
    # reads the variable once, so it only takes effect if torch is imported
    # after this package; THP_MEM_ALLOC_ENABLE=0 keeps PyTorch's default.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

try:
    from importlib.metadata import version as _version

    __version__ = _version("napari-cnnt")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "load_model": "napari_cnnt.model.checkpoint",
    "save_model": "napari_cnnt.model.checkpoint",
    "CheckpointError": "napari_cnnt.model.checkpoint",
    "CNNTConfig": "napari_cnnt.model.config",
    "ConfigError": "napari_cnnt.model.config",
    "PRESETS": "napari_cnnt.model.config",
    "CNNTDenoiser": "napari_cnnt.model.denoiser",
    "denoise": "napari_cnnt.inference",
    "Cancelled": "napari_cnnt.inference",
    "finetune": "napari_cnnt.training.api",
    "train": "napari_cnnt.training.api",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:
    from .model.checkpoint import CheckpointError, load_model, save_model
    from .model.config import PRESETS, CNNTConfig, ConfigError
    from .inference import Cancelled, denoise
    from .model.denoiser import CNNTDenoiser
    from .training.api import finetune, train


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_cnnt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
