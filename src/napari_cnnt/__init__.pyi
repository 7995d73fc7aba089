from .inference import Cancelled, denoise
from .model.checkpoint import CheckpointError, load_model, save_model
from .model.config import PRESETS, CNNTConfig, ConfigError
from .model.denoiser import CNNTDenoiser
from .training.api import finetune, train

__all__ = [
    "CNNTConfig",
    "CNNTDenoiser",
    "Cancelled",
    "CheckpointError",
    "ConfigError",
    "PRESETS",
    "denoise",
    "finetune",
    "load_model",
    "save_model",
    "train",
]
