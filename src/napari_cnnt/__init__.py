"""napari-cnnt: denoise fluorescence time-lapses with CNNT, in napari or from scripts.

The public API is small and imports no Qt::

    import napari_cnnt
    model = napari_cnnt.load_model()            # the bundled backbone
    clean = napari_cnnt.denoise(stack, model)   # [T, H, W] -> [T, H, W]
    tuned, history = napari_cnnt.finetune(model, [(noisy, clean)])

Heavy modules (torch) load on first use, so napari starts quickly.
"""

from __future__ import annotations

import os
import sys

import lazy_loader

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

# The public names, and the modules they come from, are declared once, in
# ``__init__.pyi``; they load on first use.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
__all__ = [*__all__, "__version__"]
