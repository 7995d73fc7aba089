"""napari dock widgets: denoise and fine-tune, thin layers over the library.

Each widget collects parameters, calls :func:`napari_cnnt.denoise` or
:func:`napari_cnnt.finetune` on a worker thread, and turns progress and
errors into what the user sees. ``models.MODELS`` lists the models both
widgets can use during a napari session.
"""

from .denoise import DenoiseWidget
from .finetune import FinetuneWidget
from .models import MODELS, ModelEntry, add_file, add_model

__all__ = ["MODELS", "DenoiseWidget", "FinetuneWidget", "ModelEntry", "add_file", "add_model"]
