"""The README's pictures, made with the bundled model on the synthetic sample.

    xvfb-run -a python docs/make_screenshots.py [NAME ...]

writes, in ``docs/images`` (all of them, or those NAMEd without ``.png``):

- ``sample_comparison.png``: noisy, denoised and true crops of one frame of
  the sample side by side, with their PSNR (docs/metrics.md);
- ``denoise_widget.png``: napari as ``napari-cnnt gui`` opens it, after the
  Denoise widget has run the bundled model on the sample;
- ``finetune_widget.png``: the Fine-tune widget adapting the bundled model
  to the sample pair, its chart filling up;
- ``finetune_selfsupervised.png``: the Fine-tune widget adapting the bundled
  model to the noisy sample alone (Clean "none"), its chart showing the
  validation in-between-frame loss.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from napari.settings import get_settings
from PIL import Image, ImageDraw, ImageFont
from qtpy.QtWidgets import QApplication

import napari_cnnt
from napari_cnnt.cli import open_viewer
from napari_cnnt.metrics import psnr_db
from napari_cnnt.runtime import Runtime

IMAGES = Path(__file__).resolve().parent / "images"
FRAME, CROP = 16, (slice(64, 192), slice(64, 192))  # a 128 x 128 region of frame 16
ZOOM = 3


def settle(seconds: float = 0.5) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def wait_until(condition, timeout: float = 1800) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the widget did not finish in time")
        settle(0.05)


def comparison(noisy: np.ndarray, denoised: np.ndarray, clean: np.ndarray, target: Path) -> None:
    """The three crops side by side, each enlarged, on the truth's contrast, titled with their PSNR."""
    lo, hi = np.percentile(clean[FRAME][CROP], [0.5, 99.8])
    titles = [f"noisy: {psnr_db(noisy, clean):.1f} dB", f"denoised: {psnr_db(denoised, clean):.1f} dB",
              "truth (noise-free)"]
    font = ImageFont.load_default(size=22)
    side, gap, head = 128 * ZOOM, 12, 40
    canvas = Image.new("L", (3 * side + 2 * gap, side + head), color=255)
    draw = ImageDraw.Draw(canvas)
    for i, (stack, title) in enumerate(zip((noisy, denoised, clean), titles)):
        crop = np.clip((stack[FRAME][CROP].astype(np.float32) - lo) / (hi - lo), 0, 1)
        tile = Image.fromarray((crop * 255).astype(np.uint8)).resize((side, side), Image.Resampling.NEAREST)
        x = i * (side + gap)
        canvas.paste(tile, (x, head))
        draw.text((x + side // 2, head // 2), title, fill=0, font=font, anchor="mm")
    canvas.save(target)


def self_supervised() -> None:
    """The Fine-tune widget training on the noisy layer alone, its chart half full."""
    from napari_cnnt.napari.widgets.finetune import NO_CLEAN

    viewer = open_viewer()
    viewer.window.resize(1700, 1000)
    noisy = viewer.layers["synthetic noisy"]
    viewer.layers.remove("synthetic clean")  # nothing clean to learn from
    denoise_dock, _ = viewer.window.add_plugin_dock_widget("napari-cnnt", "Denoise")
    tune_dock, tuner = viewer.window.add_plugin_dock_widget("napari-cnnt", "Fine-tune")
    denoise_dock.hide()
    noisy.contrast_limits = tuple(np.percentile(noisy.data[FRAME], [0.5, 99.8]))
    viewer.dims.set_point(0, FRAME)
    tuner.noisy.value = noisy
    tuner.clean.value = NO_CLEAN
    tuner.steps.value = 4  # a shorter run than the recipe's, for the picture
    settle()
    tuner.start()
    wait_until(lambda: len(tuner.records) >= 6)
    settle(1.0)
    viewer.screenshot(IMAGES / "finetune_selfsupervised.png", canvas_only=False, flash=False)
    tuner.stop()
    wait_until(lambda: not tuner.busy)
    viewer.close()


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    get_settings().application.gui_notification_level = "error"  # no pop-ups over the pictures
    wanted = set(sys.argv[1:])
    if "finetune_selfsupervised" in wanted or not wanted:
        self_supervised()
    if wanted - {"finetune_selfsupervised"} or not wanted:
        pictures()


def pictures() -> None:
    viewer = open_viewer()  # what `napari-cnnt gui` opens: the sample pair, Denoise and Fine-tune docked
    viewer.window.resize(1700, 1000)
    noisy, clean = viewer.layers["synthetic noisy"], viewer.layers["synthetic clean"]
    denoise_dock, denoiser = viewer.window.add_plugin_dock_widget("napari-cnnt", "Denoise")  # the docked ones
    tune_dock, tuner = viewer.window.add_plugin_dock_widget("napari-cnnt", "Fine-tune")
    settle()

    denoiser.layer.value = noisy
    denoiser.start()
    wait_until(lambda: not denoiser.busy)
    denoised = viewer.layers["synthetic noisy denoised"]
    expected = napari_cnnt.denoise(noisy.data, napari_cnnt.load_model(), device=Runtime.create("auto"))
    assert np.allclose(denoised.data, expected, atol=1e-3), "the widget's result differs from denoise()"
    comparison(noisy.data, denoised.data, clean.data, IMAGES / "sample_comparison.png")

    for layer in (noisy, denoised, clean):
        layer.contrast_limits = tuple(np.percentile(clean.data[FRAME], [0.5, 99.8]))
    viewer.layers.move(viewer.layers.index(denoised), 1)
    viewer.grid.enabled = True
    viewer.grid.shape = (1, 3)
    viewer.dims.set_point(0, FRAME)
    viewer.reset_view()
    viewer.layers.selection.active = denoised
    denoise_dock.raise_()
    settle(1.0)
    viewer.screenshot(IMAGES / "denoise_widget.png", canvas_only=False, flash=False)

    denoise_dock.hide()  # the Fine-tune widget and its chart get the dock's height
    tuner.epochs.value = 12
    tuner.lr.value = "1e-4"
    tuner.patch_sizes.value = "64"
    tuner.batch_size.value = 4
    settle()
    tuner.start()
    wait_until(lambda: len(tuner.records) >= 8)
    settle(1.0)
    viewer.screenshot(IMAGES / "finetune_widget.png", canvas_only=False, flash=False)
    wait_until(lambda: not tuner.busy)
    viewer.close()


if __name__ == "__main__":
    main()
