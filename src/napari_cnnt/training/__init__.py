"""Training and fine-tuning: data sources and patch sampling, the engine, LSUV, torchrun support.

Most users call :func:`napari_cnnt.finetune` or :func:`napari_cnnt.train`,
or ``napari-cnnt finetune`` / ``napari-cnnt train`` on the command line.
Names load on first use, so the command line starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "evaluate": "api",
    "finetune": "api",
    "load_samples": "api",
    "train": "api",
    "PatchSampler": "data",
    "Sample": "data",
    "Split": "data",
    "samples_from_h5": "data",
    "samples_from_pairs": "data",
    "History": "history",
    "Estimate": "plan",
    "SettingError": "plan",
    "RECIPES": "recipes",
    "Recipe": "recipes",
    "get_recipe": "recipes",
    "Progress": "history",
    "CheckpointMismatch": "trainer",
    "Trainer": "trainer",
    "TrainSettings": "trainer",
    "load_checkpoint_model": "trainer",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from .api import evaluate, finetune, load_samples, train
    from .data import PatchSampler, Sample, Split, samples_from_h5, samples_from_pairs
    from .history import History, Progress
    from .plan import Estimate, SettingError
    from .recipes import RECIPES, Recipe, get_recipe
    from .trainer import CheckpointMismatch, Trainer, TrainSettings, load_checkpoint_model


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_cnnt.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__():
    return __all__
