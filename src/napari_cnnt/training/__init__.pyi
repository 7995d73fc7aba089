from .api import evaluate, finetune, load_samples, train
from .checkpoints import CheckpointMismatch, load_checkpoint_model
from .data import PatchSampler, Sample, Split, samples_from_h5, samples_from_pairs
from .history import History, Progress
from .plan import Estimate, SettingError
from .recipes import RECIPES, Recipe, get_recipe
from .settings import TrainSettings
from .trainer import Trainer

__all__ = [
    "CheckpointMismatch",
    "Estimate",
    "History",
    "PatchSampler",
    "Progress",
    "RECIPES",
    "Recipe",
    "Sample",
    "SettingError",
    "Split",
    "TrainSettings",
    "Trainer",
    "evaluate",
    "finetune",
    "get_recipe",
    "load_checkpoint_model",
    "load_samples",
    "samples_from_h5",
    "samples_from_pairs",
    "train",
]
