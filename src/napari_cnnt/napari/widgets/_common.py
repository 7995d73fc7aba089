"""Pieces both widgets use: the model chooser, device choices, progress, messages."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from magicgui.widgets import CheckBox, ComboBox, Container, Label, ProgressBar, PushButton
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QComboBox, QFileDialog

from ...model.checkpoint import CheckpointError
from ...runtime import fast_path_supported, fast_path_unavailable, resolve_device
from ._messages import clock, sentence
from .models import MODELS, ModelEntry, add_file

MODEL_FILES = "CNNT models (*.safetensors *.pt *.pth *.zip rdf.yaml);;All files (*)"


def follow_layer_list(widget: Container, viewer: Any) -> None:
    """Refresh ``widget``'s layer choosers whenever the layer list changes."""
    events = viewer.layers.events
    for event in (events.inserted, events.removed, events.reordered, events.renamed):
        event.connect(widget.reset_choices)


def compact(combo: ComboBox, chars: int = 14) -> ComboBox:
    """Keep long layer or model names from widening the dock and squeezing napari's canvas."""
    combo.native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.native.setMinimumContentsLength(chars)
    return combo


# ----------------------------------------------------------------------------- devices
def device_choices() -> list[tuple[str, str]]:
    """Automatic, the CPU, and every GPU torch can see."""
    choices = [("Automatic", "auto"), ("CPU", "cpu")]
    for i in range(torch.cuda.device_count()):
        choices.append((f"GPU {i}: {torch.cuda.get_device_name(i)}", f"cuda:{i}"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append(("Apple GPU (MPS)", "mps"))
    return choices


def fast_path_default(device: str) -> bool:
    """Whether the bfloat16 fast path pays off on ``device``."""
    try:
        return fast_path_supported(resolve_device(device))
    except ValueError:
        return False


def fast_path_blocker(device: str) -> str | None:
    """Why ``device`` cannot run the fast path, or ``None`` if it can."""
    try:
        return fast_path_unavailable(resolve_device(device))
    except ValueError as e:
        return str(e)


FAST_PATH_TIP = (
    "bfloat16 arithmetic: 2-3x faster on CPUs with AVX512-BF16 or AMX, faster on GPUs, "
    "slightly less exact; on other CPUs it is slower."
)


def device_widgets() -> tuple[ComboBox, CheckBox]:
    """The *Device* choice and the *Fast path* box, which follows the device's support:
    ticked where it pays off, and disabled, saying why, where it cannot run."""
    device = compact(ComboBox(label="Device", choices=device_choices()))
    fast = CheckBox(text="Fast path (bfloat16)")

    def follow(value: str) -> None:
        blocker = fast_path_blocker(value)
        fast.value = blocker is None and fast_path_default(value)
        fast.enabled = blocker is None
        fast.tooltip = FAST_PATH_TIP if blocker is None else sentence(f"Not available: {blocker}")

    follow(device.value)
    device.changed.connect(follow)
    return device, fast


# ----------------------------------------------------------------------------- model chooser
class ModelChooser(Container):
    """The session's models (see ``models.MODELS``) and a button to open a model file."""

    def __init__(self, label: str = "Model"):
        self.combo = compact(ComboBox(choices=self._choices, label=label))
        self.open_button = PushButton(text="Open file...")
        self.open_button.tooltip = "A napari-cnnt model, or a reference checkpoint (.pt) with its JSON"
        super().__init__(widgets=[self.combo, self.open_button], layout="horizontal", labels=False, label=label)
        self.margins = (0, 0, 0, 0)
        self.open_button.changed.connect(self._open_file)
        for signal in (MODELS.events.inserted, MODELS.events.removed, MODELS.events.changed):
            signal.connect(self.combo.reset_choices)

    @property
    def entry(self) -> ModelEntry | None:
        return self.combo.value

    @entry.setter
    def entry(self, entry: ModelEntry) -> None:
        self.combo.reset_choices()
        self.combo.value = entry

    def _choices(self, _widget: Any = None) -> list[tuple[str, ModelEntry]]:
        return [(e.name, e) for e in MODELS]

    def detach(self) -> None:
        for signal in (MODELS.events.inserted, MODELS.events.removed, MODELS.events.changed):
            signal.disconnect(self.combo.reset_choices, missing_ok=True)

    def _open_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.native, "Open a CNNT model", "", MODEL_FILES)
        if not path:
            return
        config = None
        if Path(path).suffix.lower() in (".pt", ".pth") and not Path(path).with_suffix(".json").is_file():
            config, _ = QFileDialog.getOpenFileName(
                self.native, f"Choose the run configuration (JSON) of {Path(path).name}",
                str(Path(path).parent), "JSON (*.json)",
            )
            if not config:
                return
        try:
            self.entry = add_file(path, config or None)
        except CheckpointError as e:
            show_error(sentence(f"This model file cannot be used: {e}"))


# ----------------------------------------------------------------------------- progress
class ProgressDisplay:
    """A progress bar and a status line in the widget, mirrored in napari's activity panel.

    napari's progress bars process pending Qt events while they update, so a
    run can finish (and :meth:`finish` run) in the middle of :meth:`update`;
    the widget's own display is therefore written first, and napari's bar is
    closed again if the run ended meanwhile.
    """

    def __init__(self):
        self.bar = ProgressBar(value=0, min=0, max=1, label="Progress")
        self.status = Label(value="", label="")
        self.status.native.setWordWrap(True)  # long lines must not widen the dock and squeeze the canvas
        self._activity: napari_progress | None = None
        self._running = False
        self._started = time.monotonic()
        self._description = ""

    def start(self, description: str) -> None:
        self.finish("")
        self._running = True
        self._started = time.monotonic()
        self._description = description
        self.bar.max, self.bar.value = 1, 0
        self.status.value = f"{description}: starting..."

    def update(self, done: int, total: int, what: str) -> None:
        if not self._running:
            return
        self.bar.max, self.bar.value = max(total, 1), done
        elapsed = time.monotonic() - self._started
        text = f"{what}\n{clock(elapsed)} elapsed"
        if 0 < done < total:
            text += f", about {clock(elapsed * (total - done) / done)} left"
        self.status.value = text
        activity = self._activity or napari_progress(total=total, desc=self._description)
        self._activity = activity
        activity.update(done - activity.n)
        if not self._running:
            self._close_activity()

    def finish(self, message: str) -> None:
        self._running = False
        self._close_activity()
        self.status.value = message

    def _close_activity(self) -> None:
        activity, self._activity = self._activity, None
        if activity is not None:
            activity.close()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started
