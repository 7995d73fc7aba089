"""Shared fixtures and helpers of the widget tests (a real napari viewer under xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qtpy.QtCore import Qt

from napari_cnnt.model import CNNTDenoiser
from napari_cnnt.napari.widgets import MODELS

PLUGIN = "napari-cnnt"


@pytest.fixture
def tiny_model(tiny_config) -> CNNTDenoiser:
    torch.manual_seed(0)
    return CNNTDenoiser(tiny_config).eval()


@pytest.fixture(autouse=True)
def _session_models():
    """Each test starts with only the bundled model listed, as a fresh napari would."""
    yield
    while len(MODELS) > 1:
        MODELS.pop()


@pytest.fixture
def notes():
    """The texts of napari notifications shown during the test, as ``(severity, message)``."""
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def record(n):
        seen.append((str(n.severity), str(n.message)))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


def dock(viewer, name: str):
    """Open one of the plugin's widgets as napari does from the Plugins menu."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def click(qtbot, button) -> None:
    assert button.enabled, f"{button.text!r} is disabled"
    qtbot.mouseClick(button.native, Qt.MouseButton.LeftButton)


def wait_idle(qtbot, widget, timeout: float = 60.0) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=int(timeout * 1000))


def errors(notes) -> list[str]:
    return [m for s, m in notes if s == "error"]


def stack(shape, seed: int = 0) -> np.ndarray:
    """A uint16 time-lapse with some structure, so that denoising has something to do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    blob = 2000 + 1500 * np.sin(yy / 3.0) * np.cos(xx / 4.0)
    return (blob + rng.poisson(200, size=shape)).astype(np.uint16)
