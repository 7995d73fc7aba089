"""The interlaced objective: learning to denoise a time-lapse from its own frames.

The frames of one parity (every other frame) are the network's input, and the
target at each of them is made of its two neighbouring frames, of the other
parity, which the network never sees (after DeepCAD's odd/even frames). Camera
noise is independent from frame to frame, so the target's noise is
independent of everything in the input and the squared error is lowest for
the clean signal the target stands for (Noise2Noise).

The plain mean of the neighbours stands for the clean frame only where the
scene does not change within two frame intervals; drift, bleaching and
moving structures make it a blurred frame, and a network trained on it
learns to blur (0.7 dB lost on mitochondria drifting half a pixel a frame,
``benchmarks/bench_selfsupervised.py``). So :func:`between_frames` adds the
change the starting model's output shows between the neighbours and the
frame, weighted by ``TrainSettings.motion_correction``: what moves is then
carried by the starting model's output. That output is fixed before
training, and its noise-free part is all that matters for the target's
clean part; it does hold some of the frame's own noise, which pulls the
network towards the starting model, and its frame-to-frame errors become
part of the target, hence a weight below 1 (docs/training.md).

Compared with a blind spot (:mod:`~napari_cnnt.training.blindspot`) every
input pixel is a real measurement at the noise level being denoised, so the
network is not taught to distrust the pixel it denoises, and every output
pixel carries a loss. The cost is that training sees the recording at half
its frame rate.

Shapes: stacks ``[T, H, W]``, batches ``[B, T, C, H, W]``, ``T >= 2``.
"""

from __future__ import annotations

import numpy as np


def input_frames(frames: int, parity: int) -> np.ndarray:
    """Indices of the frames the network sees: ``parity``, ``parity + 2``, ... below ``frames``."""
    if frames < 2:
        raise ValueError(f"the interlaced objective needs at least 2 frames, got {frames}")
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")
    return np.arange(parity, frames, 2)


def frames_seen(frames: int) -> int:
    """How many frames of a ``frames``-frame patch the network sees at most (either parity)."""
    return (frames + 1) // 2


def neighbours(frames: int) -> tuple[np.ndarray, np.ndarray]:
    """For every frame, the frame before and the frame after it (the one neighbour, twice, at
    either end)."""
    if frames < 2:
        raise ValueError(f"the interlaced objective needs at least 2 frames, got {frames}")
    t = np.arange(frames)
    return np.where(t > 0, t - 1, t + 1), np.where(t < frames - 1, t + 1, t - 1)


def between_frames(noisy, start, motion: float = 1.0):
    """The target of every frame of a ``[T, H, W]`` stack (float32 numpy or torch): the mean of
    its two neighbouring frames plus ``motion`` times the change that ``start`` (the starting
    model's output, same shape) shows between them and the frame. ``motion=1``: the starting
    model's frame plus the neighbours' residuals ``noisy - start``; ``motion=0``: the plain mean.
    Frame ``t``'s target holds no noisy value of frame ``t``, nor of any frame of its parity."""
    if tuple(noisy.shape) != tuple(start.shape):
        raise ValueError(f"the stack and the starting model's output differ in shape: {noisy.shape}, {start.shape}")
    before, after = neighbours(len(noisy))
    return 0.5 * (noisy[before] + noisy[after]) + motion * (start - 0.5 * (start[before] + start[after]))


def training_batch(noisy: np.ndarray, target: np.ndarray, parity: int) -> tuple[np.ndarray, np.ndarray]:
    """The input frames of ``parity`` of a ``[B, T, C, H, W]`` batch and their targets: the
    clean frames of pairs, :func:`between_frames` of noisy stacks (:attr:`Sample.target`)."""
    seen = input_frames(noisy.shape[1], parity)
    return np.ascontiguousarray(noisy[:, seen]), np.ascontiguousarray(target[:, seen])


__all__ = ["between_frames", "frames_seen", "input_frames", "neighbours", "training_batch"]
