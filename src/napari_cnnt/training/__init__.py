"""Training and fine-tuning: data sources and patch sampling, the engine, LSUV, torchrun support.

Most users call :func:`napari_cnnt.finetune` or :func:`napari_cnnt.train`,
or ``napari-cnnt finetune`` / ``napari-cnnt train`` on the command line.
"""

from .api import finetune, load_samples, train
from .data import PatchSampler, Sample, Split, samples_from_h5, samples_from_pairs
from .history import History, Progress
from .trainer import CheckpointMismatch, Trainer, TrainSettings, load_checkpoint_model

__all__ = [
    "CheckpointMismatch",
    "History",
    "PatchSampler",
    "Progress",
    "Sample",
    "Split",
    "TrainSettings",
    "Trainer",
    "finetune",
    "load_checkpoint_model",
    "load_samples",
    "samples_from_h5",
    "samples_from_pairs",
    "train",
]
