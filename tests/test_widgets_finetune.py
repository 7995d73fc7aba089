"""The fine-tune widget driven through its controls in a real napari viewer (run under xvfb-run)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog
from widget_helpers import _session_models, click, dock, errors, notes, stack, tiny_model, wait_idle  # noqa: F401

import napari_cnnt
from napari_cnnt import load_model
from napari_cnnt.io.hdf5 import write_training_pairs
from napari_cnnt.napari.widgets import MODELS, add_model
from napari_cnnt.napari.widgets import finetune as finetune_widget
from napari_cnnt.napari.widgets.finetune_setup import FILE, NO_CLEAN
from napari_cnnt.runtime import Runtime

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]
PLUGIN = "napari-cnnt"
CPU = Runtime.create("cpu", fast=False)


def _quick(widget, entry, epochs=2, patch="16", time_window=4, batch=2, steps=2):
    """Settings that train a tiny model in seconds."""
    widget.model.combo.value = entry
    widget.epochs.value = epochs
    widget.steps.value = steps
    widget.lr.value = "1e-3"
    widget.patch_sizes.value = patch
    widget.time.value = time_window
    widget.batch_size.value = batch
    widget.device.value = "cpu"
    widget.fast.value = False


def _pair(viewer, shape=(4, 32, 32)):
    clean = stack(shape, seed=1)
    noisy = (clean + np.random.default_rng(2).poisson(300, size=shape)).astype(np.uint16)
    return viewer.add_image(noisy, name="cells noisy"), viewer.add_image(clean, name="cells clean")


def test_finetune_two_epochs_on_the_sample_data_save_reload_and_denoise(
        make_napari_viewer, qtbot, tiny_model, notes, monkeypatch, tmp_path):
    viewer = make_napari_viewer()
    noisy, clean = viewer.open_sample(PLUGIN, "noisy_clean_pair")
    denoiser = dock(viewer, "Denoise")
    widget = dock(viewer, "Fine-tune")
    assert (widget.noisy.value, widget.clean.value) == (noisy, clean)
    assert widget.held_out.value == 0 and "the last quarter of each" in widget.split.value
    base = add_model(tiny_model, "tiny")
    _quick(widget, base)
    click(qtbot, widget.start_button)
    assert widget.stop_button.enabled and not widget.start_button.enabled
    wait_idle(qtbot, widget)

    assert not errors(notes)
    assert [r["epoch"] for r in widget.records] == [1, 2]
    assert [r["epoch"] for r in widget.plot.records] == [1, 2]
    assert all(np.isfinite(r["val_psnr"]) for r in widget.records)
    result = widget.result
    assert result.history.records == widget.records
    assert MODELS[-1] is result.entry and result.entry in denoiser.model.combo.choices  # offered at once
    assert any("is now in the Denoise widget" in m for _, m in notes)
    assert widget.save_button.enabled and widget.denoise_button.enabled and widget.start_button.enabled

    target = tmp_path / "tuned"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    click(qtbot, widget.save_button)
    saved = target.with_suffix(".safetensors")
    reloaded = load_model(saved)
    assert reloaded.metadata["training_source"] == "layers 'synthetic noisy' (noisy) and 'synthetic clean' (clean)"
    assert reloaded.metadata["fine_tuning"]["epochs"] == 2 and reloaded.metadata["epochs"] == 2
    assert reloaded.metadata["base_model"] == "in-memory model"
    for k, v in result.entry.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v)

    # A file is replaced only where Qt's save dialog asked about it; a name the dialog did not show is refused.
    saved.write_bytes(b"older model")
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(saved), ""))
    click(qtbot, widget.save_button)
    assert load_model(saved).config == result.entry.model.config
    older = target.with_name("older.safetensors")
    older.write_bytes(b"older model")
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target.with_name("older")), ""))
    click(qtbot, widget.save_button)
    assert older.read_bytes() == b"older model"
    assert any("older.safetensors: already exists" in m for m in errors(notes))
    notes.clear()

    # Denoise a crop with the saved file, opened in the denoise widget.
    crop = viewer.add_image(np.asarray(noisy.data[:8, :32, :32]), name="crop", scale=noisy.scale, units=noisy.units)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(saved), ""))
    click(qtbot, denoiser.model.open_button)
    denoiser.layer.value = crop
    denoiser.device.value, denoiser.fast.value = "cpu", False
    click(qtbot, denoiser.run_button)
    wait_idle(qtbot, denoiser)
    expected = napari_cnnt.denoise(crop.data, reloaded, device=CPU)
    np.testing.assert_allclose(viewer.layers["crop denoised"].data, expected, rtol=1e-5, atol=1e-3)
    assert not np.allclose(expected, napari_cnnt.denoise(crop.data, tiny_model, device=CPU))


def test_denoise_the_noisy_layer_with_the_result(make_napari_viewer, qtbot, tiny_model, notes):
    viewer = make_napari_viewer()
    noisy, _ = _pair(viewer, (4, 16, 16))
    widget = dock(viewer, "Fine-tune")
    _quick(widget, add_model(tiny_model, "tiny"), epochs=1)
    click(qtbot, widget.start_button)
    wait_idle(qtbot, widget)
    click(qtbot, widget.denoise_button)
    wait_idle(qtbot, widget)
    expected = napari_cnnt.denoise(noisy.data, widget.result.entry.model, device=CPU)
    np.testing.assert_allclose(viewer.layers["cells noisy denoised"].data, expected, rtol=1e-5, atol=1e-3)
    assert not errors(notes)


def test_stop_keeps_the_best_weights_and_the_gui_stays_responsive(make_napari_viewer, qtbot, tiny_model):
    """While a fine-tune runs, the event loop never waits more than 250 ms; Stop ends it within a step."""
    viewer = make_napari_viewer(show=True)
    _pair(viewer, (8, 64, 64))
    widget = dock(viewer, "Fine-tune")
    _quick(widget, add_model(tiny_model, "tiny"), epochs=1000, patch="32", time_window=8, batch=4)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    finetune_widget.WARM_UP.join(30)  # a user chooses settings while the widget loads torch's optimizers
    qtbot.wait(500)  # let the new window finish its first paints
    qtbot.waitUntil(lambda: widget.estimating is None and "on this machine" in widget.estimate.value,
                    timeout=30_000)  # and reads the estimate
    click(qtbot, widget.start_button)
    timer.start(10)
    qtbot.waitUntil(lambda: len(widget.records) >= 2, timeout=60_000)
    qtbot.wait(1000)
    timer.stop()
    pressed = time.perf_counter()
    click(qtbot, widget.stop_button)
    wait_idle(qtbot, widget, 10)
    stopped_in = time.perf_counter() - pressed

    gaps = np.diff(ticks)
    print(f"event loop: {len(ticks)} ticks, max gap {gaps.max() * 1000:.0f} ms; stopped in {stopped_in:.2f} s")
    assert gaps.max() < 0.25
    assert stopped_in < 5
    history = widget.result.history
    assert history.stopped and 2 <= len(history) < 1000
    assert f"Stopped after {len(history)} of 1000 epochs" in widget.progress.status.value
    best = history.best_epoch
    assert history.records[best - 1]["val_loss"] == min(history["val_loss"]) if best else True


def test_stop_before_the_first_epoch_keeps_the_starting_weights(make_napari_viewer, qtbot, tiny_model,
                                                                 monkeypatch):
    viewer = make_napari_viewer()
    _pair(viewer, (8, 64, 64))
    widget = dock(viewer, "Fine-tune")
    _quick(widget, add_model(tiny_model, "tiny"), epochs=3, patch="16, 32", batch=1)
    started = []
    library_finetune = finetune_widget.finetune

    def held_after_the_first_step(*args, progress, stop, **kwargs):
        def report(p):
            started.append(p)
            stop.wait(10)
            progress(p)
        return library_finetune(*args, progress=report, stop=stop, **kwargs)

    monkeypatch.setattr(finetune_widget, "finetune", held_after_the_first_step)
    click(qtbot, widget.start_button)
    qtbot.waitUntil(lambda: bool(started), timeout=20_000)
    click(qtbot, widget.stop_button)
    wait_idle(qtbot, widget, 10)
    history = widget.result.history
    assert history.stopped and len(history) == 0 and history.best_epoch == 0
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(widget.result.entry.model.state_dict()[k], v)
    assert "kept the starting model: no epoch was finished" in widget.progress.status.value


def test_shape_mismatch_is_explained(make_napari_viewer, qtbot, tiny_model, notes):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((20, 256, 256), np.uint16), name="noisy")
    viewer.add_image(np.zeros((20, 256, 128), np.uint16), name="clean")
    widget = dock(viewer, "Fine-tune")
    _quick(widget, add_model(tiny_model, "tiny"))
    expected = ("The noisy and clean layers must have the same shape: 'noisy' is 20 x 256 x 256, "
                "'clean' is 20 x 256 x 128.")
    assert widget.split.value == expected
    click(qtbot, widget.start_button)
    assert errors(notes) == [expected]
    assert widget.start_button.enabled and not widget.busy


def test_training_errors_from_the_library_and_memory_are_explained(make_napari_viewer, qtbot, tiny_model, notes,
                                                                   monkeypatch):
    viewer = make_napari_viewer()
    _pair(viewer, (4, 16, 16))
    widget = dock(viewer, "Fine-tune")
    _quick(widget, add_model(tiny_model, "tiny"), patch="15")
    click(qtbot, widget.start_button)
    wait_idle(qtbot, widget)
    assert errors(notes) == ["Fine-tuning failed: patch size 15 x 15 is not a multiple of 2, which this model's "
                             "2 levels need."]
    assert widget.start_button.enabled and not widget.stop_button.enabled and widget.result is None

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(finetune_widget, "finetune", no_memory)
    widget.patch_sizes.value = "16"
    click(qtbot, widget.start_button)
    wait_idle(qtbot, widget)
    assert errors(notes)[-1] == ("Fine-tuning ran out of memory. Try a smaller batch size, smaller patches or a "
                                 "shorter time window.")
    assert widget.start_button.enabled

    widget.losses.value = "ssim 1, psnr 2"
    click(qtbot, widget.start_button)
    assert errors(notes)[-1].startswith("'psnr 2' is not a loss")
    assert widget.start_button.enabled and not widget.busy


def test_rectangles_of_a_shapes_layer_choose_the_regions(make_napari_viewer, tiny_model):
    viewer = make_napari_viewer()
    noisy, clean = _pair(viewer, (4, 32, 32))
    noisy.scale = clean.scale = (1, 0.5, 0.5)
    widget = dock(viewer, "Fine-tune")
    shapes = viewer.add_shapes(name="regions")
    widget.regions.value = shapes
    assert widget.split.value.startswith("No shape in 'regions'")
    # world coordinates: the layers' pixels are 0.5 units
    shapes.add_rectangles([[[0, 0], [8, 8]], [[4, 6], [12, 16]]])
    assert widget.held_out.value == 0  # with up to three samples, a part of each validates
    assert widget.split.value == ("2 samples train; the last quarter of each (its width, height or frames) "
                                  "validates.")
    assert widget.training_data().load()[1] == "regions"
    widget.held_out.value = 1
    assert widget.split.value == "Training on cells noisy region 1; validating on cells noisy region 2."
    train, val = widget.training_data().load()
    (n0, c0, roi0), = train
    (_, _, roi1), = val
    assert roi0 == (0, 0, 16, 16) and roi1 == (8, 12, 24, 32)
    assert np.array_equal(n0, noisy.data) and np.array_equal(c0, clean.data)


def test_an_hdf5_training_file_first_samples_and_held_out_part(make_napari_viewer, qtbot, tiny_model, tmp_path):
    path = tmp_path / "train.h5"
    pairs = [(stack((4, 16, 16), seed=s) + 100, stack((4, 16, 16), seed=s)) for s in range(4)]
    write_training_pairs(path, pairs, ["a", "b", "c", "d"])
    viewer = make_napari_viewer()
    widget = dock(viewer, "Fine-tune")
    widget.source.value = FILE
    assert widget.noisy.native.isHidden() and not widget.file.native.isHidden()
    widget.file.value = path
    widget.first.value = 4
    assert widget.held_out.value == 1
    widget.first.value = 3
    assert widget.held_out.value == 0
    widget.held_out.value = 1
    assert widget.split.value == "Training on train.h5:a, train.h5:b; validating on train.h5:c."
    _quick(widget, add_model(tiny_model, "tiny"), epochs=1)
    click(qtbot, widget.start_button)
    wait_idle(qtbot, widget)
    split = widget.result.history.split
    assert len(split.train) == 2 and len(split.val) == 1
    assert widget.result.provenance["training_source"] == "file train.h5"


def test_closing_the_widget_or_the_viewer_stops_training(make_napari_viewer, qtbot, tiny_model):
    for close in ("widget", "viewer"):
        viewer = make_napari_viewer()
        _pair(viewer, (8, 32, 32))
        widget = dock(viewer, "Fine-tune")
        _quick(widget, add_model(tiny_model, "tiny"), epochs=1000)
        click(qtbot, widget.start_button)
        job = widget.job
        qtbot.waitUntil(lambda widget=widget: widget.progress.bar.value > 0, timeout=20_000)
        if close == "widget":
            viewer.window.remove_dock_widget(widget.native)
        else:
            viewer.close()
        assert job.wait(5), f"closing the {close} left training running"
        assert job.stop_event.is_set()


def test_the_widget_and_the_command_line_start_from_the_same_recipe(make_napari_viewer, qtbot, tiny_model, notes):
    from napari_cnnt.cli import build_parser
    from napari_cnnt.training.cli import _options, _recipe
    from napari_cnnt.training.recipes import FEW_SAMPLE, REFERENCE

    viewer = make_napari_viewer()
    _pair(viewer, (6, 40, 40))
    widget = dock(viewer, "Fine-tune")
    r = FEW_SAMPLE.settings
    assert widget.recipe.value == "few-sample"
    assert (widget.epochs.value, widget.steps.value, widget.lr.value) == (r.epochs, r.steps_per_epoch, f"{r.lr:g}")
    assert widget.losses.value == "ssim 1, mse 1"
    assert (widget.patch_sizes.value, widget.time.value, widget.batch_size.value) == ("auto", 0, 0)
    assert widget.settings() == {}  # nothing differs from the recipe: finetune() gets its defaults
    args = build_parser().parse_args(["finetune", "--h5files", "x.h5"])
    assert _recipe(args).name == "few-sample" and _options(args, new_model=False) == {"lsuv": False}

    widget.recipe.value = "reference"
    assert (widget.epochs.value, widget.steps.value, widget.patch_sizes.value) == (30, 0, "128, 160")
    assert (widget.time.value, widget.batch_size.value, widget.lr.value) == (16, 8, "2.5e-05")
    assert widget.settings() == {}
    args = build_parser().parse_args(["finetune", "--h5files", "x.h5", "--recipe", "reference"])
    assert REFERENCE.with_options(**_options(args, new_model=False)) == REFERENCE.settings

    # Before Start: how long the run will take here; a few-sample run with the defaults, then its outcome.
    widget.recipe.value = "few-sample"
    widget.model.combo.value = add_model(tiny_model, "tiny")
    widget.device.value, widget.fast.value = "cpu", False
    qtbot.waitUntil(lambda: "on this machine" in widget.estimate.value, timeout=30_000)
    assert widget.estimate.value.startswith("About ")
    assert "120 steps of 4 x 6 x 24 x 24" in widget.estimate.value  # patches fitted to the 40 x 24 training part
    widget.epochs.value, widget.steps.value = 2, 2
    click(qtbot, widget.start_button)
    wait_idle(qtbot, widget)
    history = widget.result.history
    assert widget.result.entry.model.metadata["training"]["recipe"] == "few-sample"
    assert history.summary() in widget.progress.status.value
    assert not errors(notes)

    widget.patch_sizes.value = "1000"
    qtbot.waitUntil(lambda: "larger than every training sample" in widget.estimate.value, timeout=30_000)
    assert widget.estimate.value.endswith("lower 'Patch sizes' to at most 40 x 24.")


def test_starting_while_the_estimate_runs_leaves_no_stale_estimate(
    make_napari_viewer, qtbot, tiny_model, notes, monkeypatch
):
    release = threading.Event()  # holds the estimate in flight until Start has been pressed
    timed = finetune_widget.estimate_time

    def slow_estimate(*args, **kwargs):
        release.wait(30)
        return timed(*args, **kwargs)

    monkeypatch.setattr(finetune_widget, "estimate_time", slow_estimate)
    viewer = make_napari_viewer()
    _pair(viewer, (4, 32, 32))
    widget = dock(viewer, "Fine-tune")
    _quick(widget, add_model(tiny_model, "tiny"))
    qtbot.waitUntil(lambda: widget.estimating is not None, timeout=10_000)
    assert widget.estimate.value == "Estimating..."
    click(qtbot, widget.start_button)
    assert widget.estimate.value == ""
    release.set()
    wait_idle(qtbot, widget)
    qtbot.waitUntil(lambda: widget.estimating is None, timeout=30_000)
    assert widget.estimate.value == "" and not errors(notes)


def test_a_noisy_layer_alone_trains_self_supervised(make_napari_viewer, qtbot, tiny_model, notes):
    """Clean "none": the self-supervised recipe's defaults, a run validated by the in-between-frame
    loss (plotted, as there is no PSNR), and a model that records how it was trained."""
    from napari_cnnt.training.recipes import SELF_SUPERVISED

    viewer = make_napari_viewer()
    noisy, clean = _pair(viewer, (4, 32, 32))
    widget = dock(viewer, "Fine-tune")
    assert widget.clean.value is clean and widget.recipe.value == "few-sample"
    assert NO_CLEAN in widget.clean.choices
    widget.clean.value = NO_CLEAN
    r = SELF_SUPERVISED.settings
    assert widget.recipe.value == "self-supervised"
    assert (widget.epochs.value, widget.steps.value, widget.lr.value) == (r.epochs, r.steps_per_epoch, f"{r.lr:g}")
    assert widget.settings() == {}
    assert "validates" in widget.split.value
    _quick(widget, add_model(tiny_model, "tiny"), patch="16")
    click(qtbot, widget.start_button)
    wait_idle(qtbot, widget)
    assert not errors(notes)
    history = widget.result.history
    model = widget.result.entry.model
    assert history.metric == "val_interlaced_loss" and len(history) == 2
    assert model.metadata["training"]["recipe"] == "self-supervised"
    assert widget.result.provenance["training_source"] == "layer 'cells noisy' (noisy, no clean image)"
    assert "in-between-frame loss" in widget.progress.status.value
    assert [key for key, *_ in widget.plot.series] == ["train_loss", "val_interlaced_loss"]
    lo, hi = widget.plot.ranges()[True]
    assert lo <= min(history["val_interlaced_loss"]) <= max(history["val_interlaced_loss"]) <= hi
    # A clean layer again: back to the recipe for pairs.
    widget.clean.value = clean
    assert widget.recipe.value == "few-sample"
