"""The denoise widget driven through its controls in a real napari viewer (run under xvfb-run)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from napari.utils import progress
from qtpy.QtWidgets import QFileDialog
from widget_helpers import _session_models, click, dock, errors, notes, stack, tiny_model, wait_idle  # noqa: F401

import napari_cnnt
from napari_cnnt import save_model
from napari_cnnt.napari.widgets import MODELS, add_model
from napari_cnnt.napari.widgets import denoise as denoise_widget
from napari_cnnt.napari.widgets.denoise import NO_TIME, default_time_axis, display_range
from napari_cnnt.runtime import Runtime

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]
CPU = Runtime.create("cpu", fast=False)


def _ready(make_napari_viewer, tiny_model, data, **layer_kwargs):
    viewer = make_napari_viewer()
    layer = viewer.add_image(data, **layer_kwargs)
    widget = dock(viewer, "Denoise")
    entry = add_model(tiny_model, "tiny")
    widget.layer.value = layer
    widget.model.combo.value = entry
    widget.device.value = "cpu"
    widget.fast.value = False
    return viewer, layer, widget


def test_run_adds_a_denoised_layer_equal_to_the_library_result(make_napari_viewer, qtbot, tiny_model, notes):
    data = stack((8, 32, 32))
    viewer, layer, widget = _ready(make_napari_viewer, tiny_model, data, name="cells", scale=(5.0, 0.2, 0.2),
                                   translate=(0.0, 10.0, 20.0), axis_labels=("t", "y", "x"))
    before = data.copy()
    click(qtbot, widget.run_button)
    assert widget.busy and not widget.run_button.enabled and widget.cancel_button.enabled
    wait_idle(qtbot, widget)

    out = viewer.layers["cells denoised"]
    expected = napari_cnnt.denoise(data, tiny_model, device=CPU)
    np.testing.assert_allclose(out.data, expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(layer.data, before)  # the source is untouched
    np.testing.assert_allclose(out.scale, layer.scale)
    np.testing.assert_allclose(out.translate, layer.translate)
    assert out.axis_labels == ("t", "y", "x")
    np.testing.assert_allclose(out.contrast_limits, display_range(expected), rtol=1e-4)
    assert out.contrast_limits != layer.contrast_limits
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert "Done" in widget.progress.status.value and not errors(notes)

    # Running again replaces the output; "keep" adds another layer.
    click(qtbot, widget.run_button)
    wait_idle(qtbot, widget)
    assert [lay.name for lay in viewer.layers] == ["cells", "cells denoised"]
    assert viewer.layers["cells denoised"] is out
    widget.keep.value = True
    click(qtbot, widget.run_button)
    wait_idle(qtbot, widget)
    assert len(viewer.layers) == 3
    np.testing.assert_allclose(viewer.layers[-1].data, expected, rtol=1e-5, atol=1e-3)


def test_time_axis_comes_from_axis_labels_and_other_axes_run_one_by_one(make_napari_viewer, qtbot, tiny_model):
    data = stack((2, 6, 16, 16))
    viewer, _, widget = _ready(make_napari_viewer, tiny_model, data, name="multi", axis_labels=("c", "t", "y", "x"))
    assert widget.time_axis.value == 1
    assert widget.time_axis.choices == (0, 1)
    click(qtbot, widget.run_button)
    wait_idle(qtbot, widget)
    expected = napari_cnnt.denoise(data, tiny_model, device=CPU, time_axis=1)
    np.testing.assert_allclose(viewer.layers["multi denoised"].data, expected, rtol=1e-5, atol=1e-3)
    assert viewer.layers["multi denoised"].axis_labels == ("c", "t", "y", "x")


def test_default_time_axis():
    assert default_time_axis(("z", "T", "y", "x"), 4) == 1
    assert default_time_axis(("z", "c", "y", "x"), 4) == 1  # first non-spatial axis
    assert default_time_axis(("z", "y", "x"), 3) == 0
    assert default_time_axis(("-3", "-2", "-1"), 3) == 0
    assert default_time_axis(("y", "x"), 2) is None


def test_choosers_follow_the_layer_list_and_the_session_models(make_napari_viewer, tiny_model):
    viewer = make_napari_viewer()
    widget = dock(viewer, "Denoise")
    assert widget.layer.choices == ()
    a = viewer.add_image(np.zeros((4, 8, 8), np.float32), name="a")
    viewer.add_points(np.zeros((1, 3)), name="points")
    single = viewer.add_image(np.zeros((8, 8), np.float32), name="single")
    assert widget.layer.choices == (a, single)
    a.name = "renamed"
    assert "renamed" in [widget.layer.native.itemText(i) for i in range(widget.layer.native.count())]
    widget.layer.value = single
    assert widget.time_axis.value == NO_TIME
    viewer.layers.remove(single)
    assert widget.layer.choices == (a,)

    names = [e.name for e in widget.model.combo.choices]
    assert names[0].startswith("Bundled model")
    entry = add_model(tiny_model, "tuned today")
    assert widget.model.combo.choices[-1] is entry  # offered at once


def _paced_denoise(monkeypatch) -> list[bool]:
    """The widget's denoise with batches as slow as a real model's (a tiny one could finish
    before a click lands); returns, per batch, whether stop had been asked for."""
    calls = []

    def paced(*args, progress, stop, **kwargs):
        def report(done, total):
            calls.append(stop.is_set())
            progress(done, total)
            time.sleep(0.02)
        return napari_cnnt.denoise(*args, progress=report, stop=stop, **kwargs)

    monkeypatch.setattr(denoise_widget, "denoise", paced)
    return calls


def test_cancel_stops_within_one_batch_and_adds_nothing(make_napari_viewer, qtbot, tiny_model, notes, monkeypatch):
    calls = _paced_denoise(monkeypatch)
    viewer, _, widget = _ready(make_napari_viewer, tiny_model, stack((8, 64, 64)), name="long")
    widget.auto_tiles.value = False
    widget.tile.values, widget.overlap.values = (4, 16, 16), (1, 4, 4)
    widget.batch_size.value = 1
    click(qtbot, widget.run_button)
    qtbot.waitUntil(lambda: widget.progress.bar.value > 0, timeout=20_000)
    assert [p.desc for p in progress._all_instances] == ["Denoising 'long'"]  # napari's activity panel
    click(qtbot, widget.cancel_button)
    wait_idle(qtbot, widget, 10)

    assert calls.count(True) <= 1  # at most the batch running when Cancel was pressed
    assert widget.progress.bar.max > len(calls)
    assert [lay.name for lay in viewer.layers] == ["long"]
    assert any("cancelled" in m for _, m in notes)
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert not progress._all_instances


def test_closing_the_widget_cancels_its_run(make_napari_viewer, qtbot, tiny_model, monkeypatch):
    _paced_denoise(monkeypatch)
    viewer, _, widget = _ready(make_napari_viewer, tiny_model, stack((8, 64, 64)), name="long")
    widget.auto_tiles.value = False
    widget.tile.values, widget.overlap.values = (4, 16, 16), (1, 4, 4)
    widget.batch_size.value = 1
    click(qtbot, widget.run_button)
    job = widget.run.job
    qtbot.waitUntil(lambda: widget.progress.bar.value > 0, timeout=20_000)
    viewer.window.remove_dock_widget(widget.native)
    assert job.wait(5) and job.stop_event.is_set()
    assert [lay.name for lay in viewer.layers] == ["long"]


def test_error_without_an_image_layer(make_napari_viewer, qtbot, tiny_model, notes):
    viewer = make_napari_viewer()
    viewer.add_points(np.zeros((1, 2)))
    widget = dock(viewer, "Denoise")
    click(qtbot, widget.run_button)
    assert errors(notes) == ["There is no image to denoise: open an image or choose an image layer first."]
    assert widget.run_button.enabled and not widget.busy


def test_bundled_model_without_weights_is_listed_and_explained(make_napari_viewer, qtbot, notes, monkeypatch, tmp_path):
    monkeypatch.setattr("napari_cnnt.napari.widgets.models.BUNDLED_WEIGHTS", tmp_path / "missing.safetensors")
    viewer = make_napari_viewer()
    viewer.add_image(stack((4, 16, 16)))
    widget = dock(viewer, "Denoise")
    assert widget.model.entry is MODELS[0]
    click(qtbot, widget.run_button)
    (message,) = errors(notes)
    assert "no bundled model yet" in message and "Open a model file or fine-tune a model" in message
    assert widget.run_button.enabled


def test_a_bad_model_file_is_refused_with_a_sentence(make_napari_viewer, qtbot, notes, monkeypatch, tmp_path):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"this is not a model")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(bad), ""))
    viewer = make_napari_viewer()
    widget = dock(viewer, "Denoise")
    click(qtbot, widget.model.open_button)
    (message,) = errors(notes)
    assert message.startswith("This model file cannot be used:") and "not a CNNT model file" in message
    assert len(MODELS) == 1 and widget.model.entry is MODELS[0]


def test_model_files_open_from_the_chooser(make_napari_viewer, qtbot, tiny_model, monkeypatch, tmp_path):
    """A napari-cnnt file, and a reference checkpoint whose JSON is asked for when it is not beside it."""
    native = save_model(tiny_model, tmp_path / "mine.safetensors")
    reference = tmp_path / "run.pt"
    torch.save(tiny_model.state_dict(), reference)
    config = tmp_path / "configs" / "run-config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(tiny_model.config.to_dict()))
    answers = [str(native), str(reference), str(config)]
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (answers.pop(0), ""))

    viewer = make_napari_viewer()
    data = stack((4, 16, 16))
    viewer.add_image(data, name="img")
    widget = dock(viewer, "Denoise")
    widget.device.value, widget.fast.value = "cpu", False
    click(qtbot, widget.model.open_button)
    assert widget.model.entry.path == native.resolve()
    click(qtbot, widget.model.open_button)
    assert not answers and widget.model.entry.name == "run.pt"
    assert [e.name for e in MODELS][1:] == ["mine.safetensors", "run.pt"]
    click(qtbot, widget.run_button)
    wait_idle(qtbot, widget)
    expected = napari_cnnt.denoise(data, tiny_model, device=CPU)
    np.testing.assert_allclose(viewer.layers["img denoised"].data, expected, rtol=1e-5, atol=1e-3)


def test_out_of_memory_is_explained_and_the_widget_recovers(make_napari_viewer, qtbot, tiny_model, notes,
                                                             monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(denoise_widget, "denoise", no_memory)
    viewer, _, widget = _ready(make_napari_viewer, tiny_model, stack((4, 16, 16)), name="img")
    click(qtbot, widget.run_button)
    wait_idle(qtbot, widget)
    assert errors(notes) == ["Denoising 'img' ran out of memory. Try a smaller tile size or batch size, or the CPU."]
    assert len(viewer.layers) == 1 and widget.run_button.enabled and not widget.cancel_button.enabled

    monkeypatch.undo()
    click(qtbot, widget.run_button)
    wait_idle(qtbot, widget)
    assert "img denoised" in viewer.layers


def test_rgb_layers_are_refused(make_napari_viewer, qtbot, tiny_model, notes):
    viewer, _, widget = _ready(make_napari_viewer, tiny_model, np.zeros((16, 16, 3), np.uint8), name="photo",
                               rgb=True)
    click(qtbot, widget.run_button)
    assert "'photo' is an RGB image" in errors(notes)[0]
    assert widget.run_button.enabled


def test_the_widget_is_in_the_layers_filter_menu(make_napari_viewer):
    from napari._app_model import get_app_model

    make_napari_viewer()
    items = get_app_model().menus.get_menu("napari/layers/filter")
    assert "napari-cnnt.denoise_widget" in [getattr(i, "command", None) and i.command.id for i in items]


def test_the_readme_script_denoises_a_file_headless(tiny_model, tmp_path, monkeypatch):
    from pathlib import Path

    from napari_cnnt.io.tiff import read_tiff, write_tiff

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    script = readme.split("## In napari", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "napari.Viewer(show=False)" in script
    data = stack((6, 16, 16))
    monkeypatch.chdir(tmp_path)
    write_tiff("cells.tif", data, axes="TYX", scale=(2.0, 0.3, 0.3), unit="um")
    save_model(tiny_model, "mine.safetensors")
    exec(compile(script, "README.md", "exec"), {})
    (saved,) = read_tiff("cells-denoised.tif")
    np.testing.assert_allclose(saved.data, napari_cnnt.denoise(data, tiny_model), rtol=1e-5, atol=1e-3)
    assert saved.axes == "TYX" and saved.scale[-1] == pytest.approx(0.3)


def test_progress_survives_the_run_ending_while_napari_updates_its_bar(qtbot, monkeypatch):
    """napari's progress bars process pending events, so the end of a run can arrive in the middle of an update."""
    from napari_cnnt.napari.widgets import _common

    display = _common.ProgressDisplay()
    made = []

    class EndsTheRun(progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
            display.finish("Done.")

    monkeypatch.setattr(_common, "napari_progress", EndsTheRun)
    display.start("Denoising 'x'")
    display.update(1, 10, "1 of 10 tiles")
    assert display.status.value == "Done."
    assert made and made[0] not in progress._all_instances  # not left open in the activity panel
    display.update(2, 10, "2 of 10 tiles")
    assert display.status.value == "Done." and len(made) == 1


@pytest.mark.parametrize("name", ["Denoise", "Fine-tune"])
def test_fast_path_box_follows_the_device(make_napari_viewer, monkeypatch, name):
    from napari_cnnt.napari.widgets import _common

    monkeypatch.setattr(_common, "fast_path_default", lambda device: device == "auto")
    monkeypatch.setattr(_common, "fast_path_blocker", lambda device: None)
    widget = dock(make_napari_viewer(), name)
    widget.device.value = "cpu"
    assert widget.fast.value is False
    widget.device.value = "auto"
    assert widget.fast.value is True
    widget.fast.value = False  # the user's choice stands until the device changes again
    assert widget.fast.value is False


@pytest.mark.parametrize("name", ["Denoise", "Fine-tune"])
def test_fast_path_box_is_disabled_where_bf16_cannot_run(make_napari_viewer, no_bf16, name):
    widget = dock(make_napari_viewer(), name)
    for device in ("cpu", "auto"):
        widget.device.value = device
        assert widget.fast.value is False and widget.fast.enabled is False
        assert "cannot run the bfloat16 fast path" in widget.fast.tooltip
        assert widget.fast.native.isEnabled() is False  # greyed out in the dock, not only in magicgui
