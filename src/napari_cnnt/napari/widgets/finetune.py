"""The fine-tune widget: adapt a model to a few noisy/clean pairs, watching the losses.

Training data are two image layers (or a CNNT HDF5 training file); the first
N samples are used, optionally only inside rectangles of a Shapes layer, and
the last K of them are held out for validation (0: the last quarter of every
sample). The controls start at a recipe's values (:mod:`napari_cnnt.training.recipes`,
the few-sample one by default); "auto" leaves a setting to the data and the
machine, and only values that differ from the recipe's are passed on. Before
Start the widget estimates, in the background, how long the run will take on
this machine. :func:`napari_cnnt.finetune` runs on a worker thread; the result
joins the session's models at once and can be saved or used to denoise the
noisy layer.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    ComboBox, Container, FileEdit, Label, LineEdit, PushButton, RadioButtons, SpinBox,
)
from qtpy.QtCore import QTimer
from napari.layers import Image, Shapes
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog

from ...io import ImageFileError
from ...io.hdf5 import read_training_pairs
from ...losses import LOSSES
from ...model.bioimageio import save_package
from ...model.checkpoint import CheckpointError, provenance_of, save_model
from ...runtime import Runtime
from ...training.api import finetune, prepare_run
from ...training.data import h5_keys
from ...training.history import Progress
from ...training.plan import SettingError, estimate_time, minutes_text
from ...training.recipes import DEFAULT_FINETUNE, RECIPES, Recipe
from ._common import (
    ModelChooser, ProgressDisplay, compact, device_widgets, explain, follow_layer_list, sentence, shape_text,
)
from ._jobs import Job, Outcome
from ._plot import LossPlot
from .denoise import DenoiseRequest, DenoiseRun, UserError
from .models import ModelEntry, add_model

if TYPE_CHECKING:
    import napari

LAYERS, FILE = "Image layers", "HDF5 training file"
WHOLE = "whole images"
MEMORY_HINT = "Try a smaller batch size, smaller patches or a shorter time window."
AUTO = "auto"
FINETUNE_RECIPES = ("few-sample", "reference")
# How the controls name the settings a refusal is about.
SETTING_NAMES = {"patch_sizes": "'Patch sizes'", "val_patch_size": "'Patch sizes'", "batch_size": "'Batch size'",
                 "time": "'Time window'", "epochs": "'Epochs'", "lr": "'Learning rate'",
                 "steps_per_epoch": "'Steps per epoch'"}
PACKAGE_SUFFIX = ".zip"
SAVE_FORMATS = {  # the save dialog's file types and the suffix each writes
    "napari-cnnt model (*.safetensors)": ".safetensors",
    "bioimage.io model package (*.zip)": PACKAGE_SUFFIX,
}


# ----------------------------------------------------------------------------- parsing
def parse_losses(text: str) -> tuple[list[str], list[float]]:
    """``"ssim 1.0, mse 0.1"`` -> ``(["ssim", "mse"], [1.0, 0.1])``; a missing weight is 1."""
    names, weights = [], []
    lookup = {k.lower(): k for k in LOSSES}
    for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        words = part.replace("*", " ").split()
        try:
            name, weight = words[0], float(words[1]) if len(words) > 1 else 1.0
            if len(words) > 2 or name.lower() not in lookup:
                raise ValueError
        except (ValueError, IndexError):
            raise UserError(
                f"'{part}' is not a loss: write name and weight pairs separated by commas, e.g. "
                f"'ssim 1.0, mse 0.1'; the losses are {', '.join(LOSSES)}."
            ) from None
        names.append(lookup[name.lower()])
        weights.append(weight)
    if not names:
        raise UserError("Give at least one loss, e.g. 'ssim 1.0, mse 0.1'.")
    return names, weights


def parse_patch_sizes(text: str) -> list[tuple[int, int]] | None:
    """``"128, 160"`` or ``"128x96"`` -> ``[(128, 128), (160, 160)]`` / ``[(128, 96)]``; ``"auto"`` -> None."""
    if text.strip().lower() == AUTO:
        return None
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*(?:[x\u00d7]\s*(\d+))?", part.lower())
        if match is None or int(match[1]) < 1 or int(match[2] or match[1]) < 1:
            raise UserError(
                f"'{part}' is not a patch size: write sizes in pixels separated by commas, e.g. '128, 160' "
                "or '128x96'."
            )
        sizes.append((int(match[1]), int(match[2] or match[1])))
    if not sizes:
        raise UserError("Give at least one patch size, e.g. '128, 160', or 'auto'.")
    return sizes


def parse_learning_rate(text: str) -> float:
    try:
        lr = float(text)
        if not 0 < lr < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"The learning rate must be a number between 0 and 1, e.g. 2.5e-5; got '{text}'.") from None
    return lr


def _format_losses(names: tuple[str, ...], weights: tuple[float, ...]) -> str:
    return ", ".join(f"{n} {w:g}" for n, w in zip(names, weights))


def _format_patches(sizes: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(str(h) if h == w else f"{h}x{w}" for h, w in sizes)


# ----------------------------------------------------------------------------- training data
@dataclass
class TrainingData:
    """The samples chosen in the widget, read into memory only on the worker thread.

    Each item of ``items`` is ``(name, read)`` where ``read()`` returns
    ``(noisy, clean)`` or ``(noisy, clean, roi)``; the last ``n_val`` validate.
    ``title`` names the data in short (for the model's name), ``source`` in full.
    """

    items: list[tuple[str, Callable[[], tuple]]]
    n_val: int
    title: str
    source: str

    def names(self) -> list[str]:
        return [name for name, _ in self.items]

    def split_text(self) -> str:
        names, k = self.names(), self.n_val
        if not names:
            return "No training samples."
        if k == 0:
            return (f"{_count(len(names))} train; the last quarter of each (its width, height or frames) "
                    "validates.")
        return f"Training on {_list(names[:-k])}; validating on {_list(names[-k:])}."

    def load(self) -> tuple[list[tuple], list[tuple] | str]:
        """Training pairs and validation pairs, or ``"regions"`` when a part of each sample validates."""
        pairs = [read() for _, read in self.items]
        if self.n_val == 0:
            return pairs, "regions"
        return pairs[: -self.n_val], pairs[-self.n_val:]


def _count(n: int) -> str:
    return "1 sample" if n == 1 else f"{n} samples"


def _list(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def layer_rois(shapes: Shapes, image: Image) -> list[tuple[int, int, int, int]]:
    """The bounding boxes ``(top, left, bottom, right)`` of the shapes, in the image's pixels."""
    s_scale, s_shift = np.asarray(shapes.scale)[-2:], np.asarray(shapes.translate)[-2:]
    i_scale, i_shift = np.asarray(image.scale)[-2:], np.asarray(image.translate)[-2:]
    height, width = image.data.shape[-2:]
    rois = []
    for vertices in shapes.data:
        yx = (np.asarray(vertices)[:, -2:] * s_scale + s_shift - i_shift) / i_scale
        top, left = np.floor(yx.min(axis=0)).astype(int)
        bottom, right = np.ceil(yx.max(axis=0)).astype(int)
        top, left, bottom, right = max(top, 0), max(left, 0), min(bottom, height), min(right, width)
        if bottom > top and right > left:
            rois.append((int(top), int(left), int(bottom), int(right)))
    return rois


def _layer_pair(noisy: Any, clean: Any, index: int | None, roi: Any) -> Callable[[], tuple]:
    def read() -> tuple:
        n, c = (np.asarray(a if index is None else a[index]) for a in (noisy, clean))
        return (n, c) if roi is None else (n, c, roi)
    return read


def layers_data(noisy: Image | None, clean: Image | None, first: int, regions: Any, n_val: int) -> TrainingData:
    """Samples from a noisy and a clean layer: ``[T, Y, X]`` (one sample) or ``[S, T, Y, X]``."""
    if noisy is None or clean is None:
        raise UserError("Choose a noisy and a clean image layer (open the sample data to try it out).")
    if noisy is clean:
        raise UserError(f"The noisy and the clean layer are both '{noisy.name}': choose two different layers.")
    for layer in (noisy, clean):
        if layer.rgb or layer.multiscale or not 2 <= layer.ndim <= 4:
            raise UserError(
                f"'{layer.name}' cannot be used for training: it must be a single-channel [T, Y, X] stack, "
                "or [samples, T, Y, X]."
            )
    if tuple(noisy.data.shape) != tuple(clean.data.shape):
        raise UserError(
            f"The noisy and clean layers must have the same shape: '{noisy.name}' is "
            f"{shape_text(noisy.data.shape)}, '{clean.name}' is {shape_text(clean.data.shape)}."
        )
    indices = [None] if noisy.ndim < 4 else list(range(noisy.data.shape[0]))
    if first > 0:
        indices = indices[:first]
    rois: list[Any] = [None]
    if isinstance(regions, Shapes):
        rois = layer_rois(regions, noisy)
        if not rois:
            raise UserError(f"No shape in '{regions.name}' lies on '{noisy.name}': draw rectangles on the image.")
    items = []
    for i in indices:
        for j, roi in enumerate(rois):
            name = noisy.name + ("" if i is None else f" #{i}") + ("" if roi is None else f" region {j + 1}")
            items.append((name, _layer_pair(noisy.data, clean.data, i, roi)))
    source = f"layers '{noisy.name}' (noisy) and '{clean.name}' (clean)"
    return TrainingData(items, _check_val(n_val, len(items)), noisy.name, source)


def file_data(path: Path | None, first: int, n_val: int) -> TrainingData:
    """Samples from the groups of a CNNT HDF5 training file, in file order."""
    if path is None or not Path(path).is_file():
        raise UserError("Choose a CNNT HDF5 training file (one group per sample, with noisy_im and clean_im).")
    try:
        keys = h5_keys(path)
    except (ImageFileError, OSError) as e:
        raise UserError(sentence(f"This training file cannot be used: {e}")) from None
    if first > 0:
        keys = keys[:first]
    items = [(f"{Path(path).name}:{k}", _h5_reader(path, k)) for k in keys]
    return TrainingData(items, _check_val(n_val, len(items)), Path(path).name, f"file {Path(path).name}")


def _h5_reader(path: Path, key: str) -> Callable[[], tuple]:
    def read() -> tuple:
        pairs = read_training_pairs(path)
        try:
            noisy, clean = next((n, c) for name, n, c in pairs if name == key)
            return noisy[()], clean[()]
        finally:
            pairs[0][1].file.close()
    return read


def _check_val(n_val: int, n: int) -> int:
    if n > 0 and n_val >= n:
        raise UserError(
            f"Only {n} sample(s) are in use, so at most {n - 1} can be held out for validation "
            "(0: the last quarter of every sample validates)."
        )
    return n_val


def default_held_out(n: int) -> int:
    """As ``finetune`` does: with up to three samples a part of each validates (0), with more a fifth."""
    from ...training.data import FEW_SAMPLES

    return max(1, round(n / 5)) if n > FEW_SAMPLES else 0


@dataclass
class FinetuneResult:
    entry: ModelEntry
    history: Any
    provenance: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the widget
def _load_optimizer_machinery() -> None:
    import torch._dynamo  # noqa: F401


# torch's optimizers import torch._dynamo on first use, which holds the GIL for a
# few hundred milliseconds; loading it when the widget opens keeps that pause out
# of the first training run.
WARM_UP = threading.Thread(target=_load_optimizer_machinery, name="napari-cnnt warm-up", daemon=True)


class FinetuneWidget(Container):
    """Fine-tune a CNNT model on noisy/clean pairs, without blocking napari."""

    def __init__(self, napari_viewer: napari.Viewer):
        self.viewer = napari_viewer
        self.source = RadioButtons(choices=[LAYERS, FILE], value=LAYERS, label="Training data",
                                   orientation="horizontal")
        self.noisy = compact(ComboBox(label="Noisy", choices=self._image_layers))
        self.clean = compact(ComboBox(label="Clean", choices=self._image_layers))
        self.file = FileEdit(mode="r", filter="*.h5 *.hdf5", label="Training file", visible=False)
        self.first = SpinBox(label="Samples (0: all)", value=0, min=0, max=100_000)
        self.first.tooltip = "Use the first N samples (groups of the file, or the first axis of 4-D layers)."
        self.regions = compact(ComboBox(label="Regions", choices=self._shapes_layers))
        self.regions.tooltip = "Train only inside the rectangles of a Shapes layer (each one is a sample)."
        self.held_out = SpinBox(label="Held out", value=0, min=0, max=100_000)
        self.held_out.tooltip = "The last K samples validate; 0: the last quarter of every sample validates."
        self.split = Label(value="", label="Validation")
        self.split.native.setWordWrap(True)
        self.model = ModelChooser("Base model")
        self.recipe = ComboBox(label="Recipe", choices=list(FINETUNE_RECIPES), value=DEFAULT_FINETUNE)
        self.recipe.tooltip = "The settings below start at this recipe's values (see docs/training.md)."
        self.epochs = SpinBox(label="Epochs", min=1, max=100_000)
        self.steps = SpinBox(label="Steps per epoch", min=0, max=100_000)
        self.steps.tooltip = "Steps of random patches between validations; 0: one pass over the samples."
        self.steps.native.setSpecialValueText("one pass")
        self.lr = LineEdit(label="Learning rate")
        self.losses = LineEdit(label="Losses")
        self.losses.tooltip = f"Name and weight pairs; losses: {', '.join(LOSSES)}"
        self.patch_sizes = LineEdit(label="Patch sizes")
        self.patch_sizes.tooltip = ("Height (x width) of the training patches, one sampler per size; 'auto': "
                                    "the recipe's, no larger than the samples")
        self.time = SpinBox(label="Time window", min=0, max=4096)
        self.time.native.setSpecialValueText(AUTO)
        self.time.tooltip = "Frames per patch; auto: the recipe's, no more than the shortest stack has."
        self.batch_size = SpinBox(label="Batch size", min=0, max=4096)
        self.batch_size.native.setSpecialValueText(AUTO)
        self.batch_size.tooltip = "Patches per step; auto: the recipe's, fewer if memory is short."
        self.device, self.fast = device_widgets()
        self.estimate = Label(value="", label="Estimate")
        self.estimate.native.setWordWrap(True)
        self.use_recipe()
        self.start_button = PushButton(text="Start")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.stop_button.tooltip = "Stop after the current step; the best weights so far are kept."
        self.progress = ProgressDisplay()
        self.save_button = PushButton(text="Save model...", enabled=False)
        self.denoise_button = PushButton(text="Denoise the noisy layer", enabled=False)
        row = Container(widgets=[self.start_button, self.stop_button], layout="horizontal", labels=False)
        after = Container(widgets=[self.save_button, self.denoise_button], layout="horizontal", labels=False)
        row.margins = after.margins = (0, 0, 0, 0)
        super().__init__(widgets=[
            self.source, self.noisy, self.clean, self.file, self.first, self.regions, self.held_out, self.split,
            self.model, self.recipe, self.epochs, self.steps, self.lr, self.losses, self.patch_sizes, self.time,
            self.batch_size, self.device, self.fast, self.estimate, row, self.progress.bar, self.progress.status,
        ])
        self.plot = LossPlot()
        self.native.layout().addWidget(self.plot)
        self.append(after)

        self.job: Job | None = None
        self.denoising: DenoiseRun | None = None
        self.result: FinetuneResult | None = None
        self.records: list[dict[str, float]] = []
        self._run_info: dict[str, Any] = {}
        self._watched: Shapes | None = None
        self._n_samples = -1
        self.estimating: Job | None = None
        self._estimate_again = False
        self._estimate_timer = QTimer()
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(400)
        self._estimate_timer.timeout.connect(self._start_estimate)

        self.source.changed.connect(self._source_changed)
        for w in (self.noisy, self.clean, self.file, self.first, self.regions, self.held_out):
            w.changed.connect(self._update_split)
        self.recipe.changed.connect(self.use_recipe)
        for w in (self.model.combo, self.epochs, self.steps, self.lr, self.losses, self.patch_sizes, self.time,
                  self.batch_size, self.device, self.fast):
            w.changed.connect(self._schedule_estimate)
        self.start_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        self.save_button.changed.connect(self.save)
        self.denoise_button.changed.connect(self.denoise_noisy)
        follow_layer_list(self, self.viewer)
        self.native_parent_changed.connect(self._parent_changed)
        self.native.destroyed.connect(self._close_jobs)
        self._pick_pair()
        self._source_changed()
        if WARM_UP.ident is None:  # not started yet
            WARM_UP.start()

    # ------------------------------------------------------------------ choices
    def _image_layers(self, _widget: Any = None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _shapes_layers(self, _widget: Any = None) -> list[tuple[str, Any]]:
        shapes = [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Shapes)]
        return [(WHOLE, WHOLE)] + shapes

    def _pick_pair(self) -> None:
        """Preselect layers whose names or roles say noisy and clean, else two different layers."""
        layers = [layer for _, layer in self._image_layers()]
        for widget, role in ((self.noisy, "noisy"), (self.clean, "clean")):
            for layer in layers:
                if layer.metadata.get("role") == role or role in layer.name.lower():
                    widget.value = layer
                    break
        if self.noisy.value is self.clean.value and len(layers) > 1:
            self.clean.value = next(layer for layer in layers if layer is not self.noisy.value)

    def reset_choices(self, *_: Any) -> None:
        had = (self.noisy.value, self.clean.value)
        super().reset_choices()
        if None in had or had[0] is had[1]:
            self._pick_pair()
        self._update_split()

    def _source_changed(self, *_: Any) -> None:
        layers = self.source.value == LAYERS
        for w in (self.noisy, self.clean, self.regions):
            w.visible = layers
        self.file.visible = not layers
        self._update_split()

    def training_data(self, held_out: int | None = None) -> TrainingData:
        """The samples the controls describe; raises :class:`UserError`."""
        k = self.held_out.value if held_out is None else held_out
        if self.source.value == FILE:
            value = self.file.value
            path = Path(value) if value and str(value) not in ("", ".") else None
            return file_data(path, self.first.value, k)
        return layers_data(self.noisy.value, self.clean.value, self.first.value, self.regions.value, k)

    def _update_split(self, *_: Any) -> None:
        """Show which samples train and which validate; a new set of samples gets the usual share held out."""
        self._watch_regions()
        try:
            n = len(self.training_data(held_out=0).items)
            if n != self._n_samples:
                self._n_samples = n
                with self.held_out.changed.blocked():
                    self.held_out.value = default_held_out(n)
            self.split.value = self.training_data().split_text()
        except UserError as e:
            self.split.value = str(e)
        self._schedule_estimate()

    def _watch_regions(self) -> None:
        """Follow the rectangles being drawn in the chosen Shapes layer."""
        regions = self.regions.value if isinstance(self.regions.value, Shapes) else None
        if regions is self._watched:
            return
        if self._watched is not None:
            self._watched.events.data.disconnect(self._update_split)
        if regions is not None:
            regions.events.data.connect(self._update_split)
        self._watched = regions

    # ------------------------------------------------------------------ training
    @property
    def busy(self) -> bool:
        return self.job is not None or self.denoising is not None

    @property
    def chosen_recipe(self) -> Recipe:
        return RECIPES[self.recipe.value]

    def use_recipe(self, *_: Any) -> None:
        """Set the controls to the chosen recipe's values ("auto" where it leaves them to the data)."""
        recipe = self.chosen_recipe
        r = recipe.settings
        self.epochs.value = r.epochs
        self.steps.value = r.steps_per_epoch
        self.lr.value = f"{r.lr:g}"
        self.losses.value = _format_losses(r.loss, r.loss_weights)
        self.patch_sizes.value = AUTO if "patch_sizes" in recipe.auto else _format_patches(r.patch_sizes)
        self.time.value = 0 if "time" in recipe.auto else r.time
        self.batch_size.value = 0 if "batch_size" in recipe.auto else r.batch_size

    def settings(self) -> dict[str, Any]:
        """``finetune`` options from the controls: the values that differ from the recipe's
        (automatic ones left out); raises :class:`UserError`."""
        names, weights = parse_losses(self.losses.value)
        r = self.chosen_recipe.settings
        values = {
            "epochs": self.epochs.value,
            "steps_per_epoch": self.steps.value,
            "lr": parse_learning_rate(self.lr.value),
            "loss": tuple(names),
            "loss_weights": tuple(weights),
            "patch_sizes": parse_patch_sizes(self.patch_sizes.value),
            "time": self.time.value or None,
            "batch_size": self.batch_size.value or None,
        }
        if values["patch_sizes"] is not None:
            values["patch_sizes"] = tuple(values["patch_sizes"])
        return {k: v for k, v in values.items() if v is not None and v != getattr(r, k)}

    # ------------------------------------------------------------------ the estimate
    def _schedule_estimate(self, *_: Any) -> None:
        if not getattr(self, "_estimate_timer", None) or self.job is not None:
            return
        self._estimate_timer.start()

    def _start_estimate(self) -> None:
        """Plan the run the controls describe and time one step, on a helper thread."""
        if self.job is not None:
            return
        if self.estimating is not None:
            self._estimate_again = True
            return
        try:
            data = self.training_data()
            if not data.items:
                raise UserError("")
            options, recipe = self.settings(), self.recipe.value
            entry = self.model.entry
            if entry is None:
                raise UserError("")
            base = entry.load()
            runtime = Runtime.create(self.device.value, self.fast.value)
        except (UserError, CheckpointError, ValueError):
            self.estimate.value = ""
            return

        def task(report: Callable[[Any], None], stop: Any) -> Any:
            train, val = data.load()
            _, val_samples, _, plan = prepare_run(base, train, val, recipe, options, runtime)
            n_val = len(val_samples) * plan.settings.val_patches_per_sample
            return plan, estimate_time(base, plan, runtime, n_val)

        self.estimate.value = "Estimating..."
        self.estimating = Job(task, on_report=lambda _: None, on_end=self._estimated)
        self.estimating.start()

    def _estimated(self, outcome: Outcome) -> None:
        self.estimating = None
        if self.job is None:
            if outcome.error is not None:
                error = outcome.error
                text = error.message(SETTING_NAMES) if isinstance(error, SettingError) else str(error)
                self.estimate.value = sentence(text)
            else:
                plan, estimate = outcome.value
                self.estimate.value = estimate_text(plan, estimate)
        if self._estimate_again:
            self._estimate_again = False
            self._schedule_estimate()

    def start(self, *_: Any) -> None:
        if self.busy:
            return
        try:
            data = self.training_data()
            if not data.items:
                raise UserError("There are no samples to train on.")
            settings = self.settings()
            recipe = self.recipe.value
            entry = self.model.entry
            if entry is None:
                raise UserError("Choose a base model first.")
            base = entry.load()
        except (UserError, CheckpointError) as e:
            show_error(sentence(str(e)))
            return
        device, fast = self.device.value, self.fast.value

        def task(report: Callable[[Any], None], stop: Any) -> Any:
            train, val = data.load()
            return finetune(base, train, recipe, val_pairs=val, device=device, fast=fast, callback=report,
                            stop=stop, **settings)

        self._estimate_timer.stop()
        self.records = []
        epochs = settings.get("epochs", self.chosen_recipe.settings.epochs)
        self.plot.set_records([], epochs)
        self._run_info = {"entry": entry, "data": data, "settings": {"recipe": recipe, **settings}}
        self.job = Job(task, on_report=self._report, on_end=self._ended, keep=lambda p: p.event == "epoch")
        self._set_busy(True)
        self.progress.start(f"Fine-tuning '{entry.name}'")
        self.job.start()

    def stop(self, *_: Any) -> None:
        if self.job is not None:
            self.progress.status.value = "Stopping after this step; the best weights so far are kept..."
            self.job.stop()
        elif self.denoising is not None:
            self.denoising.cancel()

    def _report(self, p: Progress) -> None:
        done, total = (p.epoch - 1) * p.steps + p.step, p.epochs * p.steps
        self.progress.update(done, total, f"epoch {p.epoch} of {p.epochs}, step {p.step} of {p.steps}, "
                                          f"loss {p.loss:.4g}")
        if p.event == "epoch" and p.record is not None:
            self.records.append(dict(p.record))
            self.plot.set_records(self.records, p.epochs)

    def _ended(self, outcome: Outcome) -> None:
        self.job = None
        info = self._run_info
        if outcome.error is not None:
            self.progress.finish("Failed.")
            error = outcome.error
            if isinstance(error, SettingError):
                error = ValueError(error.message(SETTING_NAMES))
            show_error(explain(error, "Fine-tuning", MEMORY_HINT))
        else:
            model, history = outcome.value
            data: TrainingData = info["data"]
            entry = add_model(model, f"{info['entry'].name} fine-tuned on {data.title}")
            provenance = {"training_source": data.source, "fine_tuning": dict(info["settings"])}
            self.result = FinetuneResult(entry, history, provenance)
            message = _summary(history, model.metadata["training"]["epochs"])
            self.progress.finish(message)
            show_info(f"{message} '{entry.name}' is now in the Denoise widget's model list.")
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        self.start_button.enabled = not busy
        self.stop_button.enabled = busy
        self.save_button.enabled = self.denoise_button.enabled = not busy and self.result is not None

    # ------------------------------------------------------------------ the result
    def save(self, *_: Any, path: str | os.PathLike | None = None) -> Path | None:
        """Save the fine-tuned model with its provenance, asking where (and as what) if no ``path``:
        a napari-cnnt file (``.safetensors``) or a bioimage.io model package (``.zip``), which is
        written in the background."""
        if self.result is None or self.busy:
            return None
        chosen = ""
        confirmed = None  # the file Qt's save dialog asked about replacing
        if path is None:
            default = self.result.entry.name.replace(" ", "_").replace("'", "") + ".safetensors"
            path, chosen = QFileDialog.getSaveFileName(self.native, "Save the fine-tuned model", default,
                                                       ";;".join(SAVE_FORMATS))
            if not path:
                return None
            confirmed = Path(path)
        path = Path(path)
        package = SAVE_FORMATS.get(chosen, path.suffix.lower()) == PACKAGE_SUFFIX
        suffix = PACKAGE_SUFFIX if package else ".safetensors"
        if path.suffix.lower() != suffix:
            path = path.with_name(path.name + suffix)
        overwrite = path == confirmed
        if package:
            return self._save_package(path, overwrite)
        try:
            save_model(self.result.entry.model, path, overwrite=overwrite, **self.result.provenance)
        except CheckpointError as e:
            show_error(sentence(f"The model could not be saved to {path}: {e}"))
            return None
        self.result.entry.path = path
        show_info(f"Saved the model to {path}.")
        return path

    def _save_package(self, path: Path, overwrite: bool = False) -> Path:
        """Write the bioimage.io package on a worker thread (it runs the model on its test data)."""
        entry, provenance = self.result.entry, provenance_of(self.result.entry.model, **self.result.provenance)

        def task(report: Callable[[Any], None], stop: Any) -> Path:
            return save_package(entry.model, path, provenance, name=entry.name, overwrite=overwrite)

        def ended(outcome: Outcome) -> None:
            self.job = None
            if outcome.error is not None:
                self.progress.finish("Failed.")
                show_error(explain(outcome.error, f"Saving the package {path.name}", MEMORY_HINT))
            else:
                self.progress.finish(f"Saved {path.name}.")
                show_info(f"Saved the model as a bioimage.io package to {path}.")
            self._set_busy(False)

        self.job = Job(task, on_report=lambda _: None, on_end=ended)
        self._set_busy(True)
        self.stop_button.enabled = False
        self.progress.start(f"Writing the bioimage.io package {path.name}")
        self.job.start()
        return path

    def denoise_noisy(self, *_: Any) -> None:
        """Denoise the noisy layer with the fine-tuned model, automatic tiles."""
        if self.result is None or self.busy:
            return
        layer = self.noisy.value
        if layer is None:
            show_error("Choose the noisy layer to denoise first.")
            return
        try:
            request = DenoiseRequest(layer, self.result.entry.model, self.result.entry.name,
                                     time_axis=layer.ndim - 3 if layer.ndim >= 3 else None,  # [(S,) T, Y, X]
                                     runtime=Runtime.create(self.device.value, self.fast.value))
        except (UserError, ValueError) as e:
            show_error(sentence(str(e)))
            return
        self.denoising = DenoiseRun(self.viewer, request, self.progress, self._denoised)
        self._set_busy(True)
        self.denoising.start()

    def _denoised(self, _layer: Image | None) -> None:
        self.denoising = None
        self._set_busy(False)

    # ------------------------------------------------------------------ closing
    def _parent_changed(self, parent: Any) -> None:
        if parent is None:  # napari took the widget out of its dock: it was closed
            self._close_jobs()

    def _close_jobs(self, *_: Any) -> None:
        self._estimate_timer.stop()
        for job in (self.job, self.denoising.job if self.denoising else None, self.estimating):
            if job is not None:
                job.close()
        self.job = self.denoising = self.estimating = None
        self.model.detach()


def estimate_text(plan: Any, estimate: Any) -> str:
    """E.g. "About 6 min on this machine: 120 steps of 4 x 16 x 64 x 64, peak memory about 2.1 GB."."""
    s = plan.settings
    h, w = max(s.patch_sizes, key=lambda hw: hw[0] * hw[1])
    text = (f"About {minutes_text(estimate.seconds)} on this machine: {estimate.steps} steps of "
            f"{s.batch_size} x {s.time} x {h} x {w}, peak memory about {estimate.peak_bytes / 2**30:.1f} GB.")
    return " ".join([text, *(sentence(n) for n in plan.notes)])


def _summary(history: Any, epochs: int) -> str:
    psnr = history.best.get("val_psnr")
    quality = f" (validation PSNR {psnr:.1f} dB)" if psnr is not None and math.isfinite(psnr) else ""
    kept = history.summary()
    if not history.kept_start:
        kept += quality
    if history.stopped:
        return f"Stopped after {len(history)} of {epochs} epochs; {kept}."
    if history.early:
        return f"Ended after {len(history)} of {epochs} epochs, as validation stopped improving; {kept}."
    return f"Finished {epochs} epoch{'s' if epochs != 1 else ''}; {kept}."
