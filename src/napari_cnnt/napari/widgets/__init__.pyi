from .denoise import DenoiseWidget
from .finetune import FinetuneWidget
from .models import MODELS, ModelEntry, add_file, add_model

__all__ = ["MODELS", "DenoiseWidget", "FinetuneWidget", "ModelEntry", "add_file", "add_model"]
