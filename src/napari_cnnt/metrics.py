"""How napari-cnnt scores a denoised stack against its truth: one PSNR convention everywhere.

``PSNR = 10 log10(R^2 / MSE)`` in dB, where ``R`` is the range (max - min)
of the whole truth stack and ``MSE`` the mean squared difference over all
voxels of the output as the model returns it (not clipped). Training and
validation, ``napari-cnnt demo``, the widgets, the model card and the
benchmarks all report this number (docs/metrics.md).

It does not depend on the intensity scaling: a model's normalisation maps
noisy, output and truth with the same affine map, which scales ``R`` and the
root of ``MSE`` alike. So a validation PSNR computed on the model's [0, 1]
scale equals the PSNR of the same data in camera units.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def truth_range(truth: Any) -> float:
    """The peak ``R`` of the convention: max - min of the truth stack, in its own units."""
    truth = np.asarray(truth)
    return float(np.max(truth)) - float(np.min(truth))


def psnr_db(image: Any, truth: Any, peak: float | None = None) -> float:
    """PSNR in dB of ``image`` against ``truth`` (same shape), with ``peak`` (default the
    truth's range) as the peak signal. NaN for a constant truth, inf for a perfect image."""
    truth = np.asarray(truth, dtype=np.float64)
    image = np.asarray(image, dtype=np.float64)
    if image.shape != truth.shape:
        raise ValueError(f"image and truth must have the same shape, got {list(image.shape)} and {list(truth.shape)}")
    peak = truth_range(truth) if peak is None else float(peak)
    if not peak > 0:
        return float("nan")
    mse = float(np.mean((image - truth) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))
