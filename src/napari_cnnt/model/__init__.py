"""The CNNT network, its configuration and its checkpoint formats."""

from .config import PRESETS, CNNTConfig, ConfigError, preset
from .denoiser import CNNTDenoiser

__all__ = ["CNNTConfig", "CNNTDenoiser", "ConfigError", "PRESETS", "preset"]
