"""``denoise_image``: the npe2 command ``image -> image`` and the widget napari generates from it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from npe2 import PluginManager
from widget_helpers import _session_models, click, notes, stack, tiny_model  # noqa: F401

import napari_cnnt
import napari_cnnt.inference as inference
from napari_cnnt import save_model
from napari_cnnt.napari import functions
from napari_cnnt.runtime import Runtime

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]
CPU = Runtime.create("cpu", fast=False)


@pytest.fixture
def model_file(tiny_model, tmp_path):
    return save_model(tiny_model, tmp_path / "tiny.safetensors")


def test_the_generated_widget_adds_what_denoise_returns_without_blocking(
        make_napari_viewer, qtbot, model_file, tiny_model, monkeypatch):
    viewer = make_napari_viewer()
    layer = viewer.add_image(stack((2, 6, 24, 40), seed=3), name="cells")
    _, widget = viewer.window.add_plugin_dock_widget("napari-cnnt", "Denoise (function)")
    assert [w.name for w in widget][:4] == ["image", "model", "time_axis", "tile_frames"]
    widget.reset_choices()  # as when the dock is first shown
    combo = widget.image.native  # chosen by the layer's name, as a user does
    combo.setCurrentIndex(next(i for i in range(combo.count()) if combo.itemText(i).startswith("cells")))
    assert widget.image.value is layer.data
    widget.model.value = model_file
    widget.time_axis.value = 1
    widget.device.value = "cpu"
    widget.fast_path.value = False

    release = threading.Event()
    real = inference.denoise

    def held(*args, **kwargs):  # the denoising waits until the test lets it go
        assert release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "denoise", held)
    before = len(viewer.layers)
    click(qtbot, widget.call_button)
    qtbot.wait(300)  # the event loop runs while the worker waits: napari is not blocked
    assert len(viewer.layers) == before
    release.set()
    qtbot.waitUntil(lambda: len(viewer.layers) == before + 1, timeout=30_000)

    expected = real(layer.data, tiny_model, device=CPU, time_axis=1)
    result = viewer.layers[-1]
    assert result.data.dtype == np.float32 and result.data.shape == layer.data.shape
    np.testing.assert_array_equal(result.data, expected)
    np.testing.assert_array_equal(layer.data, stack((2, 6, 24, 40), seed=3))  # the source is untouched


def test_the_npe2_command_denoises_like_denoise_and_takes_tile_options(model_file, tiny_model):
    data = stack((6, 24, 24), seed=5)
    command = PluginManager.instance().get_command("napari-cnnt.denoise_image")
    result = command.exec(kwargs={"image": data, "model": model_file, "device": "cpu", "fast_path": False})
    np.testing.assert_array_equal(result, napari_cnnt.denoise(data, tiny_model, device=CPU))
    tiled = functions.denoise_image(data, model=model_file, tile_frames=4, tile_size=16, overlap=0.5,
                                    device="cpu", fast_path=False)
    expected = napari_cnnt.denoise(data, tiny_model, tile=(4, 16, 16), overlap=(2, 8, 8), device=CPU)
    np.testing.assert_array_equal(tiled, expected)
    frame = functions.denoise_image(data[0], model=model_file, device="cpu", fast_path=False)
    assert frame.shape == (24, 24)


def test_bad_options_are_refused_with_the_reason(model_file, tmp_path):
    data = stack((4, 16, 16))
    with pytest.raises(ValueError, match="overlap must be a share of the tile"):
        functions.denoise_image(data, model=model_file, overlap=1.0)
    with pytest.raises(ValueError, match="missing.safetensors: no such model file"):
        functions.denoise_image(data, model=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="choose an image"):
        functions.denoise_image(None)


def test_napari_cnnt_gui_opens_the_sample_pair_with_both_widgets_docked(make_napari_viewer, monkeypatch, capsys):
    import napari

    from napari_cnnt.cli import main, open_viewer

    monkeypatch.setattr(napari, "Viewer", make_napari_viewer)  # the fixture's viewers are cleaned up after
    viewer = open_viewer(show=False)
    assert [layer.name for layer in viewer.layers] == ["synthetic noisy", "synthetic clean"]
    docked = {name for name in viewer.window.dock_widgets}
    assert {"Denoise (napari-cnnt)", "Fine-tune (napari-cnnt)"} <= docked
    _, denoiser = viewer.window.add_plugin_dock_widget("napari-cnnt", "Denoise")  # the docked one
    assert denoiser.layer.value is viewer.layers["synthetic noisy"]
    assert main(["gui", "missing.tif"]) == 1
    assert "missing.tif: no such file" in capsys.readouterr().err
