"""The synthetic sample data, opened from napari's sample menu contributions."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui
PLUGIN = "napari-cnnt"


def test_noisy_and_clean_samples_match(make_napari_viewer):
    viewer = make_napari_viewer()
    (noisy,) = viewer.open_sample(PLUGIN, "noisy_timelapse")
    (clean,) = viewer.open_sample(PLUGIN, "clean_timelapse")
    assert noisy.data.shape == clean.data.shape == (32, 256, 256)
    assert noisy.data.dtype == np.uint16
    assert noisy.axis_labels == clean.axis_labels == ("T", "Y", "X")
    np.testing.assert_allclose(noisy.scale, (1.0, 0.1, 0.1))
    # Same scene: the noise averages out to the clean truth.
    residual = noisy.data.astype(np.float64) - clean.data
    assert abs(residual.mean()) < 0.5
    assert np.corrcoef(noisy.data[0].ravel(), clean.data[0].ravel())[0, 1] > 0.5

    pair = viewer.open_sample(PLUGIN, "noisy_clean_pair")
    assert [layer.metadata["role"] for layer in pair] == ["noisy", "clean"]
    np.testing.assert_array_equal(pair[0].data, noisy.data)
    assert pair[0].data is not noisy.data  # layers never share a buffer
