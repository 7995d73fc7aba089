"""The models the widgets can use during this napari session.

One process-wide, evented list: the bundled model, the model files the user
opened, and the models fine-tuned since napari started. The fine-tune widget
adds to it and the denoise widget's chooser follows it at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psygnal.containers import EventedList

from ...model.checkpoint import BUNDLED_WEIGHTS, CheckpointError, load_model


@dataclass(eq=False)
class ModelEntry:
    """A model in the chooser. ``model`` is None for the bundled model until it is first used."""

    name: str
    model: Any = field(default=None, repr=False)
    path: Path | None = None
    kind: str = "file"  # "bundled", "file" or "fine-tuned"

    def load(self) -> Any:
        """The ``CNNTDenoiser``; raises ``CheckpointError`` with a sentence for the user."""
        if self.model is None:
            if self.kind == "bundled" and not BUNDLED_WEIGHTS.is_file():
                raise CheckpointError(
                    "This installation of napari-cnnt has no bundled model yet. Open a model file "
                    "or fine-tune a model, then choose it in the model list."
                )
            self.model = load_model(self.path)
        return self.model


def _bundled_entry() -> ModelEntry:
    available = BUNDLED_WEIGHTS.is_file()
    name = "Bundled model" if available else "Bundled model (not installed)"
    return ModelEntry(name, path=None, kind="bundled")


MODELS: EventedList[ModelEntry] = EventedList([_bundled_entry()])


def add_file(path: str | os.PathLike, config: str | os.PathLike | None = None) -> ModelEntry:
    """Load a model file (napari-cnnt format, or a reference checkpoint and its JSON) and list it.

    A file already listed is not loaded twice. Raises ``CheckpointError``.
    """
    path = Path(path).resolve()
    for entry in MODELS:
        if entry.path == path and entry.kind == "file":
            return entry
    model = load_model(path, config)
    entry = ModelEntry(path.name, model, path, "file")
    MODELS.append(entry)
    return entry


def add_model(model: Any, name: str) -> ModelEntry:
    """List a model held in memory (one fine-tuned in this session)."""
    taken = {e.name for e in MODELS}
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name} ({n})", n + 1
    entry = ModelEntry(unique, model, None, "fine-tuned")
    MODELS.append(entry)
    return entry
