"""Screenshots of the denoise and fine-tune widgets at work on the synthetic sample.

    xvfb-run -a python docs/make_screenshots.py

writes ``docs/images/finetune_widget.png`` and ``docs/images/denoise_widget.png``
(the README shows them). This napari-cnnt has no bundled weights yet, so a
tiny model is first trained on the sample for a few minutes (60 epochs); the pictures
show the interface, not what a full-size model achieves.
"""

from __future__ import annotations

import time
from pathlib import Path

import napari
from napari.settings import get_settings
from qtpy.QtWidgets import QApplication

from napari_cnnt import CNNTConfig, train
from napari_cnnt.napari.widgets import add_model
from napari_cnnt.normalization import Normalization

IMAGES = Path(__file__).resolve().parent / "images"
PLUGIN = "napari-cnnt"
TINY = CNNTConfig(blocks=(8, 16), blocks_per_set=1, n_head=2, pre_channels=(4, 8), dropout_p=0.0)


def settle(seconds: float = 0.5) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def wait_until(condition) -> None:
    while not condition():
        settle(0.05)


def demo_model(noisy, clean):
    """A tiny starting model, trained on the sample itself (the stand-in for the bundled model)."""
    model, _ = train([(noisy, clean)], config=TINY, normalization=Normalization("fixed", 60, 220), epochs=60,
                     lr=2e-3, loss="mse", loss_weights=(1.0,), patch_sizes=32, time=8, batch_size=8,
                     patches_per_sample=8, scheduler="none", device="cpu")
    return model


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    get_settings().application.gui_notification_level = "error"  # no pop-ups over the pictures
    viewer = napari.Viewer(title="napari-cnnt")
    viewer.window.resize(1600, 950)
    noisy, clean = viewer.open_sample(PLUGIN, "noisy_clean_pair")
    print("training the tiny starting model...", flush=True)
    base = add_model(demo_model(noisy.data, clean.data), "tiny demo model")

    _, tune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    tune.model.combo.value = base
    tune.epochs.value = 12
    tune.lr.value = "5e-4"
    tune.patch_sizes.value = "32, 64"
    tune.time.value = 8
    tune.batch_size.value = 4
    tune.device.value = "cpu"
    settle()
    tune.start()
    wait_until(lambda: len(tune.records) >= 8)
    settle(1.0)
    viewer.screenshot(IMAGES / "finetune_widget.png", canvas_only=False, flash=False)
    wait_until(lambda: not tune.busy)
    tuned = tune.result.entry
    viewer.window.remove_dock_widget(tune.native)

    _, denoiser = viewer.window.add_plugin_dock_widget(PLUGIN, "Denoise")
    denoiser.layer.value = noisy
    denoiser.model.combo.value = tuned
    denoiser.device.value = "cpu"
    denoiser.start()
    wait_until(lambda: not denoiser.busy)
    clean.visible = False
    viewer.canvas.grid.enabled = True
    viewer.dims.set_point(0, 10)
    viewer.reset_view()
    viewer.layers.selection.active = viewer.layers[f"{noisy.name} denoised"]
    settle(1.0)
    viewer.screenshot(IMAGES / "denoise_widget.png", canvas_only=False, flash=False)
    viewer.close()


if __name__ == "__main__":
    main()
