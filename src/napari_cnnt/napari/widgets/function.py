"""The *Denoise (function)* widget: napari generates it from :func:`denoise_image`'s signature.

npe2 builds a magicgui form from :func:`denoise_in_background` (``autogenerate:
true`` in the manifest); pressing *Run* calls it, which starts
:func:`~napari_cnnt.napari.functions.denoise_image` on a napari thread worker and
returns the worker. napari recognises the ``FunctionWorker[ImageData]``
annotation and adds the result as an image layer when the worker returns, on
the GUI thread, so napari stays responsive meanwhile.
"""

import inspect

from napari.qt.threading import FunctionWorker, thread_worker
from napari.types import ImageData

from ..functions import denoise_image


def denoise_in_background(*args, **kwargs) -> FunctionWorker[ImageData]:
    """Start :func:`denoise_image` on a worker thread; napari adds its result when it returns."""
    worker = thread_worker(denoise_image, start_thread=False)(*args, **kwargs)
    worker.start()  # from napari's event loop the thread starts once the widget has connected to it
    return worker


denoise_in_background.__signature__ = inspect.signature(denoise_image).replace(
    return_annotation=FunctionWorker[ImageData]
)
denoise_in_background.__doc__ = denoise_image.__doc__
