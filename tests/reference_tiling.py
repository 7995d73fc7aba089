"""A plain transcription of the reference's whole-stack inference (docs/cnnt.md, section 9).

It is the oracle the tiled ``denoise`` is checked against, and the baseline of
``benchmarks/bench_tiled.py``: every tile is cut into one array up front, run,
and blended with numpy, exactly as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from skimage.util import view_as_windows


def reference_tiled_inference(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    cutout: tuple[int, int, int],
    overlap: tuple[int, int, int],
    batch_size: int,
) -> np.ndarray:
    """Denoise a float32 ``[T, H, W]`` stack; ``predict`` maps ``[B, t, 1, h, w]`` to the same shape."""
    stride = tuple(c - o for c, o in zip(cutout, overlap))
    pad = [(o, s - n % s) for n, o, s in zip(image.shape, overlap, stride)]
    padded = np.pad(image, pad, "symmetric")
    windows = view_as_windows(padded, cutout, stride)
    grid = windows.shape[:3]
    tiles = windows.reshape(-1, *cutout)  # a copy: every tile at once

    predictions = np.zeros_like(tiles)
    for i in range(0, len(tiles), batch_size):
        predictions[i:i + batch_size] = predict(tiles[i:i + batch_size, :, None])[:, :, 0]

    weight = np.ones(cutout, dtype=np.float32)
    for axis, o in enumerate(overlap):
        for i in range(o):
            for index in (i, -1 - i):
                sl = [slice(None)] * 3
                sl[axis] = index
                weight[tuple(sl)] *= (i + 1) / o

    total = np.zeros_like(padded)
    weights = np.zeros_like(padded)
    for k, (nt, nh, nw) in enumerate(np.ndindex(*grid)):
        box = tuple(slice(n * s, n * s + c) for n, s, c in zip((nt, nh, nw), stride, cutout))
        total[box] += weight * predictions[k]
        weights[box] += weight
    total /= weights
    return total[tuple(slice(o, o + n) for o, n in zip(overlap, image.shape))]
