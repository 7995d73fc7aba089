"""napari's side of napari-cnnt: the npe2 reader, writers, sample data and dock widgets."""

from __future__ import annotations

from typing import Any

# napari's layer data tuple: (data, layer keyword arguments, layer type).
LayerData = tuple[Any, dict, str]
