"""The denoise widget: choose an image layer and a model, press Run.

The widget only collects parameters; :class:`DenoiseRun` calls
:func:`napari_cnnt.denoise` on a worker thread and puts the result in a layer
``"<name> denoised"`` beside the source, which is never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, PushButton, SpinBox
from napari.layers import Image
from napari.utils.notifications import show_error, show_info

from ...inference import Cancelled, auto_layout, denoise
from ...model.checkpoint import CheckpointError
from ...runtime import Runtime
from ._common import ModelChooser, ProgressDisplay, compact, device_widgets, follow_layer_list
from ._jobs import Job, Outcome
from ._messages import UserError, clock, explain, sentence

if TYPE_CHECKING:
    import napari

NO_TIME = -1  # the time-axis choice of a single 2-D image
SPATIAL = {"z", "y", "x"}
MEMORY_HINT = "Try a smaller tile size or batch size, or the CPU."


def default_time_axis(labels: Any, ndim: int) -> int | None:
    """The axis labelled time (``t``/``time``), else the first non-spatial one, else the first."""
    if ndim < 3:
        return None
    lead = [str(label).strip().lower() for label in list(labels)[: ndim - 2]]
    for names in ({"t", "time"}, None):
        for i, label in enumerate(lead):
            if (label in names) if names else (label not in SPATIAL):
                return i
    return 0


def display_range(data: np.ndarray) -> tuple[float, float]:
    """Contrast limits for a result: its 0.1 and 99.9 percentiles, from at most a million values."""
    flat = np.asarray(data).reshape(-1)
    sample = flat[:: max(1, flat.size // 1_000_000)]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(sample, [0.1, 99.9]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


# ----------------------------------------------------------------------------- one run
@dataclass
class DenoiseRequest:
    """Everything one run needs, fixed when Run is pressed (the worker never touches the layer)."""

    layer: Image
    model: Any
    model_name: str
    time_axis: int | None = None
    tile: tuple[int, int, int] | None = None
    overlap: tuple[int, int, int] | None = None
    batch_size: int | None = None
    runtime: Runtime | None = None
    keep: bool = False
    data: Any = field(default=None, repr=False)
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layer = self.layer
        if layer.rgb:
            raise UserError(
                f"'{layer.name}' is an RGB image; CNNT denoises single-channel fluorescence images. "
                "Split it into channels first (right-click the layer, Split RGB)."
            )
        if layer.multiscale:
            raise UserError(
                f"'{layer.name}' is a multi-resolution (pyramid) image, which cannot be denoised yet; "
                "open its full-resolution level as a plain image."
            )
        self.data = layer.data
        self.source = {
            "name": layer.name, "scale": layer.scale, "translate": layer.translate, "rotate": layer.rotate,
            "shear": layer.shear, "affine": layer.affine, "axis_labels": layer.axis_labels,
            "units": layer.units, "colormap": layer.colormap, "blending": layer.blending,
        }

    @property
    def output_name(self) -> str:
        return f"{self.source['name']} denoised"

    def run(self, report: Callable[[Any], None], stop: Any) -> np.ndarray:
        """The library call (on the worker thread)."""
        return denoise(
            self.data, self.model, tile=self.tile, overlap=self.overlap, batch_size=self.batch_size,
            device=self.runtime, time_axis=self.time_axis, progress=lambda done, total: report((done, total)),
            stop=stop,
        )


def _previous_output(viewer: napari.Viewer, request: DenoiseRequest) -> Image | None:
    for layer in viewer.layers:
        made_here = layer.metadata.get("napari_cnnt", {}).get("denoised_from") == request.source["name"]
        if isinstance(layer, Image) and layer.name == request.output_name and made_here:
            return layer
    return None


def place_result(viewer: napari.Viewer, request: DenoiseRequest, result: np.ndarray) -> Image:
    """Show ``result`` as ``"<name> denoised"``: replace the output of an earlier run unless ``keep``."""
    src = request.source
    metadata = {"napari_cnnt": {"denoised_from": src["name"], "model": request.model_name}}
    limits = display_range(result)
    old = None if request.keep else _previous_output(viewer, request)
    if old is not None and old.ndim == result.ndim:  # update it, keeping the user's display settings
        old.data = result
        old.contrast_limits_range = limits
        old.contrast_limits = limits
        old.metadata = metadata
        for key in ("scale", "translate", "rotate", "shear", "affine", "axis_labels", "units"):
            setattr(old, key, src[key])
        return old
    if old is not None:  # another number of axes: a new layer in its place
        index = viewer.layers.index(old)
        viewer.layers.remove(old)
    layer = viewer.add_image(
        result, name=request.output_name, contrast_limits=limits, metadata=metadata,
        **{k: v for k, v in src.items() if k != "name"},
    )
    if old is not None:
        viewer.layers.move(viewer.layers.index(layer), index)
    return layer


class DenoiseRun:
    """Runs one :class:`DenoiseRequest` on a worker thread and shows progress and the result."""

    def __init__(
        self,
        viewer: napari.Viewer,
        request: DenoiseRequest,
        display: ProgressDisplay,
        on_end: Callable[[Image | None], None] = lambda layer: None,
    ):
        self.viewer = viewer
        self.request = request
        self.display = display
        self._on_end = on_end
        self.job = Job(request.run, on_report=self._report, on_end=self._end)

    def start(self) -> None:
        self.display.start(f"Denoising '{self.request.source['name']}'")
        self.job.start()

    def cancel(self) -> None:
        self.display.status.value = "Cancelling..."
        self.job.stop()

    def _report(self, item: tuple[int, int]) -> None:
        done, total = item
        self.display.update(done, total, f"{done} of {total} tiles")

    def _end(self, outcome: Outcome) -> None:
        name = self.request.source["name"]
        layer = None
        if isinstance(outcome.error, Cancelled):
            self.display.finish("Cancelled.")
            show_info(f"Denoising '{name}' was cancelled; no layer was changed.")
        elif outcome.error is not None:
            self.display.finish("Failed.")
            show_error(explain(outcome.error, f"Denoising '{name}'", MEMORY_HINT))
        else:
            try:
                layer = place_result(self.viewer, self.request, outcome.value)
                self.display.finish(f"Done in {clock(self.display.elapsed)}: '{layer.name}'.")
            except Exception as e:  # noqa: BLE001 - e.g. the viewer refused the layer
                self.display.finish("Failed.")
                show_error(explain(e, "Showing the result", MEMORY_HINT))
        self._on_end(layer)


# ----------------------------------------------------------------------------- the widget
class Triple(Container):
    """Three integers (time, height, width) in one row."""

    def __init__(self, label: str, value: tuple[int, int, int], minimum: int):
        self.boxes = [SpinBox(value=v, min=minimum, max=4096) for v in value]
        for box, axis in zip(self.boxes, "TYX"):
            box.tooltip = axis
        super().__init__(widgets=self.boxes, layout="horizontal", labels=False, label=label)
        self.margins = (0, 0, 0, 0)

    @property
    def values(self) -> tuple[int, int, int]:
        return tuple(int(b.value) for b in self.boxes)

    @values.setter
    def values(self, value: tuple[int, int, int]) -> None:
        for box, v in zip(self.boxes, value):
            box.value = int(v)


class DenoiseWidget(Container):
    """Denoise an image layer with a CNNT model, without blocking napari."""

    def __init__(self, napari_viewer: napari.Viewer):
        self.viewer = napari_viewer
        self.layer = compact(ComboBox(label="Image", choices=self._image_layers))
        self.time_axis = compact(ComboBox(label="Time axis", choices=self._time_axes))
        self.time_axis.tooltip = "Other leading axes (positions, channels, Z) are denoised one by one."
        self.model = ModelChooser()
        self.auto_tiles = CheckBox(text="Automatic tile size and overlap", value=True)
        self.tile = Triple("Tile (T, Y, X)", (16, 128, 128), 1)
        self.overlap = Triple("Overlap (T, Y, X)", (4, 32, 32), 0)
        self.batch_size = SpinBox(label="Batch size (0: auto)", value=0, min=0, max=1024)
        self.batch_size.tooltip = "Tiles per network call; auto fits the device's free memory."
        self.device, self.fast = device_widgets()
        self.keep = CheckBox(text="Keep earlier results", value=False)
        self.keep.tooltip = "Add a new layer on every run instead of replacing '<name> denoised'."
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressDisplay()
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        super().__init__(widgets=[
            self.layer, self.time_axis, self.model, self.auto_tiles, self.tile, self.overlap,
            self.batch_size, self.device, self.fast, self.keep, buttons, self.progress.bar, self.progress.status,
        ])
        self.run: DenoiseRun | None = None

        self.layer.changed.connect(self._layer_changed)
        for w in (self.time_axis, self.model.combo, self.device, self.auto_tiles):
            w.changed.connect(self._update_tiles)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        follow_layer_list(self, self.viewer)
        self.native_parent_changed.connect(self._parent_changed)
        self.native.destroyed.connect(self._close_run)
        if isinstance(self.viewer.layers.selection.active, Image):
            self.layer.value = self.viewer.layers.selection.active
        self._layer_changed()

    # ------------------------------------------------------------------ choices
    def _image_layers(self, _widget: Any = None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _time_axes(self, _widget: Any = None) -> list[tuple[str, int]]:
        layer = self.layer.value
        if layer is None or layer.ndim < 3:
            return [("none (a single image)", NO_TIME)]
        shape = layer.data.shape
        return [(f"{layer.axis_labels[i]} ({shape[i]})", i) for i in range(layer.ndim - 2)]

    def _layer_changed(self, *_: Any) -> None:
        layer = self.layer.value
        self.time_axis.reset_choices()
        if layer is not None:
            axis = default_time_axis(layer.axis_labels, layer.ndim)
            self.time_axis.value = NO_TIME if axis is None else axis
        self._update_tiles()

    def _update_tiles(self, *_: Any) -> None:
        """Show the automatic tile and overlap for the current layer, model and device."""
        auto = self.auto_tiles.value
        self.tile.enabled = self.overlap.enabled = not auto
        entry, layer = self.model.entry, self.layer.value
        if not auto or entry is None or entry.model is None or layer is None:
            return
        try:
            config = entry.model.config
            tile, overlap = auto_layout(config, self._stack_shape(layer), Runtime.create(self.device.value, False))
        except ValueError:
            return
        self.tile.values = tile
        self.overlap.values = overlap

    def _stack_shape(self, layer: Image) -> tuple[int, int, int]:
        shape = layer.data.shape
        t = 1 if self.time_axis.value == NO_TIME else shape[self.time_axis.value]
        return (t, shape[-2], shape[-1])

    # ------------------------------------------------------------------ running
    @property
    def busy(self) -> bool:
        return self.run is not None

    def request(self) -> DenoiseRequest:
        """The run the controls describe; raises :class:`UserError` or ``CheckpointError``."""
        layer = self.layer.value
        if layer is None:
            raise UserError("There is no image to denoise: open an image or choose an image layer first.")
        entry = self.model.entry
        if entry is None:
            raise UserError("Choose a model first.")
        auto = self.auto_tiles.value
        return DenoiseRequest(
            layer=layer,
            model=entry.load(),
            model_name=entry.name,
            time_axis=None if self.time_axis.value == NO_TIME else self.time_axis.value,
            tile=None if auto else self.tile.values,
            overlap=None if auto else self.overlap.values,
            batch_size=self.batch_size.value or None,
            runtime=Runtime.create(self.device.value, self.fast.value),
            keep=self.keep.value,
        )

    def start(self, *_: Any) -> None:
        if self.busy:
            return
        try:
            request = self.request()
        except (UserError, CheckpointError, ValueError) as e:
            show_error(sentence(str(e)))
            return
        self.run = DenoiseRun(self.viewer, request, self.progress, self._ended)
        self._set_busy(True)
        self.run.start()

    def cancel(self, *_: Any) -> None:
        if self.run is not None:
            self.run.cancel()

    def _ended(self, _layer: Image | None) -> None:
        self.run = None
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        self.run_button.enabled = not busy
        self.cancel_button.enabled = busy

    # ------------------------------------------------------------------ closing
    def _parent_changed(self, parent: Any) -> None:
        if parent is None:  # napari took the widget out of its dock: it was closed
            self._close_run()

    def _close_run(self, *_: Any) -> None:
        if self.run is not None:
            self.run.job.close()
            self.run = None
        self.model.detach()
