"""Training and fine-tuning: data sources and patch sampling, the engine, LSUV, torchrun support.

Most users call :func:`napari_cnnt.finetune` or :func:`napari_cnnt.train`,
or ``napari-cnnt finetune`` / ``napari-cnnt train`` on the command line.
Names load on first use, so the command line starts without importing torch.
"""

import lazy_loader

# The public names are declared once, in ``__init__.pyi``.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
