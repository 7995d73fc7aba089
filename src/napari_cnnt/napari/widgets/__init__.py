"""napari dock widgets: denoise and fine-tune, thin layers over the library.

Each widget collects parameters, calls :func:`napari_cnnt.denoise` or
:func:`napari_cnnt.finetune` on a worker thread, and turns progress and
errors into what the user sees. ``models.MODELS`` lists the models both
widgets can use during a napari session. The public names (declared in
``__init__.pyi``) load on first use, so the Qt-free modules here
(``finetune_setup``, ``_messages``, ``models``) import without Qt.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
