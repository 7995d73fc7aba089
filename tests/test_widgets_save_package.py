"""The Fine-tune widget's Save model... writes a bioimage.io package when that file type is chosen."""

from __future__ import annotations

import pytest
import torch
from qtpy.QtWidgets import QFileDialog
from widget_helpers import _session_models, click, dock, errors, notes, tiny_model, wait_idle  # noqa: F401

from napari_cnnt import load_model
from napari_cnnt.napari.widgets import add_model
from napari_cnnt.napari.widgets.finetune import SAVE_FORMATS

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_torch_thread")]
PACKAGE = next(name for name, suffix in SAVE_FORMATS.items() if suffix == ".zip")


def test_save_model_as_a_bioimageio_package(make_napari_viewer, qtbot, tiny_model, notes, monkeypatch, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cnnt", "noisy_clean_pair")
    widget = dock(viewer, "Fine-tune")
    widget.model.combo.value = add_model(tiny_model, "tiny")
    widget.epochs.value, widget.lr.value, widget.patch_sizes.value = 1, "1e-3", "16"
    widget.time.value, widget.batch_size.value, widget.device.value, widget.fast.value = 4, 2, "cpu", False
    click(qtbot, widget.start_button)
    wait_idle(qtbot, widget)
    tuned = widget.result.entry.model

    offered = []

    def dialog(parent, title, default, filters):
        offered.append(filters)
        return str(tmp_path / "tuned"), PACKAGE

    monkeypatch.setattr(QFileDialog, "getSaveFileName", dialog)
    click(qtbot, widget.save_button)
    assert widget.busy and not widget.save_button.enabled  # written on a worker thread
    wait_idle(qtbot, widget)
    assert offered and "*.safetensors" in offered[0] and "*.zip" in offered[0]
    assert not errors(notes) and any("bioimage.io package" in m for _, m in notes)
    package = load_model(tmp_path / "tuned.zip")
    assert package.metadata["fine_tuning"]["epochs"] == 1
    assert package.metadata["training_source"].startswith("layers 'synthetic noisy'")
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), package.state_dict().values()))
    assert widget.save_button.enabled and widget.start_button.enabled
