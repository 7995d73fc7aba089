"""The fine-tune widget: adapt a model to a few noisy/clean pairs, watching the losses.

Training data are two image layers (or a CNNT HDF5 training file), or a noisy
layer alone (*Clean*: "none"), which trains self-supervised with its own
recipe and is validated by its loss at the frames in between; the first
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

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    PushButton,
    RadioButtons,
    SpinBox,
)
from napari.layers import Image, Shapes
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog

from ...losses import LOSSES
from ...model.bioimageio import save_package
from ...model.checkpoint import CheckpointError, provenance_of, save_model
from ...runtime import Runtime
from ...training.api import finetune, prepare_run
from ...training.history import Progress
from ...training.plan import SettingError, estimate_time
from ...training.recipes import DEFAULT_FINETUNE, RECIPES, Recipe
from ._common import ModelChooser, ProgressDisplay, compact, device_widgets, follow_layer_list
from ._jobs import Job, Outcome
from ._messages import UserError, explain, sentence
from ._plot import LossPlot
from .denoise import DenoiseRequest, DenoiseRun
from .finetune_setup import (
    AUTO,
    FILE,
    FINETUNE_RECIPES,
    LAYERS,
    MEMORY_HINT,
    NO_CLEAN,
    SELF_SUPERVISED,
    SETTING_NAMES,
    WHOLE,
    FinetuneResult,
    FinetuneRun,
    TrainingData,
    default_held_out,
    estimate_text,
    file_data,
    finetune_options,
    layers_data,
    recipe_controls,
    summary,
)
from .models import add_model

if TYPE_CHECKING:
    import napari

PACKAGE_SUFFIX = ".zip"
SAVE_FORMATS = {  # the save dialog's file types and the suffix each writes
    "napari-cnnt model (*.safetensors)": ".safetensors",
    "bioimage.io model package (*.zip)": PACKAGE_SUFFIX,
}


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
        self.clean = compact(ComboBox(label="Clean", choices=self._clean_choices))
        self.clean.tooltip = (f"The clean image of the noisy layer; '{NO_CLEAN}' trains self-supervised on the "
                              "noisy layer alone: every other frame learns to predict the frames in between "
                              "(validated by that loss on a held-out part).")
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
        self.run: FinetuneRun | None = None  # the current or last run
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
        self.clean.changed.connect(self._clean_changed)
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

    def _clean_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return self._image_layers() + [(NO_CLEAN, NO_CLEAN)]

    def _clean_changed(self, *_: Any) -> None:
        """No clean image: the self-supervised recipe and its defaults; a clean image again: few-sample."""
        alone = self.clean.value == NO_CLEAN
        if alone and self.recipe.value != SELF_SUPERVISED:
            self.recipe.value = SELF_SUPERVISED
        elif not alone and self.recipe.value == SELF_SUPERVISED:
            self.recipe.value = DEFAULT_FINETUNE

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
        if self.noisy.value is self.clean.value or self.clean.value == NO_CLEAN:
            others = [layer for layer in layers if layer is not self.noisy.value]
            self.clean.value = others[0] if others else NO_CLEAN

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
    def result(self) -> FinetuneResult | None:
        """The last run's result, while it is the last run."""
        return None if self.run is None else self.run.result

    @property
    def records(self) -> list[dict[str, float]]:
        """The current or last run's epochs."""
        return [] if self.run is None else self.run.records

    @property
    def busy(self) -> bool:
        return self.job is not None or self.denoising is not None

    @property
    def chosen_recipe(self) -> Recipe:
        return RECIPES[self.recipe.value]

    def use_recipe(self, *_: Any) -> None:
        """Set the controls to the chosen recipe's values ("auto" where it leaves them to the data)."""
        for name, value in recipe_controls(self.chosen_recipe).items():
            getattr(self, name).value = value

    def settings(self) -> dict[str, Any]:
        """``finetune`` options from the controls: the values that differ from the recipe's
        (automatic ones left out); raises :class:`UserError`."""
        controls = {name: getattr(self, name).value for name in recipe_controls(self.chosen_recipe)}
        return finetune_options(self.chosen_recipe, controls)

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
            return finetune(base, train, recipe, val_pairs=val, device=device, fast=fast, progress=report,
                            stop=stop, **settings)

        self._estimate_timer.stop()
        if self.estimating is not None:  # its result will not be shown: the run's progress says more
            self.estimate.value = ""
        self.run = FinetuneRun(entry, data, recipe, settings)
        self.plot.set_records([], self.run.epochs)
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
        if p.event == "epoch" and p.record is not None and self.run is not None:
            self.run.records.append(dict(p.record))
            self.plot.set_records(self.run.records, p.epochs)

    def _ended(self, outcome: Outcome) -> None:
        self.job = None
        run = self.run
        if outcome.error is not None:
            self.progress.finish("Failed.")
            error = outcome.error
            if isinstance(error, SettingError):
                error = ValueError(error.message(SETTING_NAMES))
            show_error(explain(error, "Fine-tuning", MEMORY_HINT))
        else:
            model, history = outcome.value
            entry = add_model(model, run.model_name())
            run.result = FinetuneResult(entry, history, run.provenance())
            message = summary(history, model.metadata["training"]["epochs"])
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


