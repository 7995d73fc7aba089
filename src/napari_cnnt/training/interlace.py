"""The interlaced objective: learning to denoise a time-lapse from its own frames.

The frames of one parity (every other frame) are the network's input, and the
target at each of them is made of its two neighbouring frames, of the other
parity, which the network never sees (after DeepCAD's odd/even frames). Camera
noise is independent from frame to frame, so the target's noise is
independent of everything in the input and the squared error is lowest for
the clean signal the target stands for (Noise2Noise).

The plain mean of the neighbours stands for the clean frame only where the
scene does not change within two frame intervals; drift and moving
structures make it a blurred frame, and a network trained on it learns to
blur (0.7 dB lost on mitochondria creeping about half a pixel a frame,
``benchmarks/bench_selfsupervised.py``). So :func:`between_frames` first
moves each neighbour onto the frame along the optical flow between them:
the flow is estimated on the starting model's output (fixed before
training, so nearly noise-free), and the noisy neighbour is resampled
along it. The target's noise is then still that of the neighbours alone,
and only its clean part is moved. On the benchmark's stacks the clean part
of the aligned target is 45.2 dB from the true frame for mitochondria and
40.9 dB for membranes, against 38.9 and 38.6 dB for the plain mean
(docs/training.md).

Compared with a blind spot (:mod:`~napari_cnnt.training.blindspot`) every
input pixel is a real measurement at the noise level being denoised, so the
network is not taught to distrust the pixel it denoises, and every output
pixel carries a loss. The cost is that training sees the recording at half
its frame rate.

Shapes: stacks ``[T, H, W]``, batches ``[B, T, C, H, W]``, ``T >= 2``.
"""

from __future__ import annotations

import numpy as np
import torch

MOTIONS = ("flow", "none")
"""How :func:`between_frames` brings the neighbours onto the frame: along the optical flow, or not at all."""

FLOW_RADIUS = 15
"""Radius in pixels of the window over which the optical flow is taken constant (skimage's iterative
Lucas-Kanade). Narrower windows follow what noise the starting model left: on the benchmark's
stacks the aligned targets were 0.4-0.7 dB (radius 7) and 2.5-4.9 dB (radius 4) further from the
true frames."""


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


def flow(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """The optical flow ``[2, H, W]`` (rows, columns, in pixels) that brings ``moving`` onto
    ``reference`` (both ``[H, W]``): ``moving`` sampled at ``grid + flow`` looks like ``reference``.

    Estimated on 2 x 2 means with 3 warps, then resized: 16 times cheaper than at full resolution
    with skimage's 10 warps, and its targets within 0.05 dB of those on the benchmark's stacks."""
    from skimage.registration import optical_flow_ilk
    from skimage.transform import downscale_local_mean, resize

    reference, moving = (np.asarray(a, np.float32) for a in (reference, moving))
    if min(reference.shape) < 32:
        return optical_flow_ilk(reference, moving, radius=FLOW_RADIUS, num_warp=3).astype(np.float32)
    small = optical_flow_ilk(downscale_local_mean(reference, (2, 2)), downscale_local_mean(moving, (2, 2)),
                             radius=FLOW_RADIUS // 2, num_warp=3)
    return np.stack([resize(2 * c, reference.shape, order=1) for c in small]).astype(np.float32)


def warp(frame, displacement: np.ndarray):
    """``frame`` (``[H, W]``, numpy or torch) sampled at ``grid + displacement`` (bilinear, edges
    repeated); linear in ``frame``, so gradients flow through it to the frame alone."""
    h, w = frame.shape
    image = torch.as_tensor(frame, dtype=torch.float32)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    d = torch.from_numpy(np.asarray(displacement, np.float32))
    y = (rows + d[0]) * (2 / max(h - 1, 1)) - 1
    x = (cols + d[1]) * (2 / max(w - 1, 1)) - 1
    grid = torch.stack([x, y], dim=-1)[None]
    out = torch.nn.functional.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="border",
                                          align_corners=True)[0, 0]
    return out if isinstance(frame, torch.Tensor) else out.numpy()


def between_frames(noisy, start, motion: str = "flow"):
    """The target of every frame of a ``[T, H, W]`` stack (float32 numpy or torch): the mean of its
    two neighbouring frames, each first moved onto the frame along the optical flow that
    ``start`` (the starting model's output, same shape, numpy) shows between them
    (``motion="flow"``), or as they are (``"none"``). Frame ``t``'s target holds no noisy value
    of frame ``t``, nor of any frame of its parity."""
    if tuple(noisy.shape) != tuple(start.shape):
        raise ValueError(f"the stack and the starting model's output differ in shape: {noisy.shape}, {start.shape}")
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    before, after = neighbours(len(noisy))
    if motion == "none":
        return 0.5 * (noisy[before] + noisy[after])
    start = np.asarray(start.detach() if isinstance(start, torch.Tensor) else start, np.float32)
    # One flow per pair of consecutive frames, the way back taken as its negative; two held at a time.
    frames, behind = [], None
    for t, (b, a) in enumerate(zip(before, after)):
        ahead = flow(start[t], start[t + 1]) if t + 1 < len(noisy) else None
        moved = [warp(noisy[n], ahead if n > t else -behind) for n in dict.fromkeys((int(b), int(a)))]
        frames.append(moved[0] if len(moved) == 1 else 0.5 * (moved[0] + moved[1]))
        behind = ahead
    return torch.stack(frames) if isinstance(noisy, torch.Tensor) else np.stack(frames)


def training_batch(noisy: np.ndarray, target: np.ndarray, parity: int) -> tuple[np.ndarray, np.ndarray]:
    """The input frames of ``parity`` of a ``[B, T, C, H, W]`` batch and their targets: the
    clean frames of pairs, :func:`between_frames` of noisy stacks (:attr:`Sample.target`)."""
    seen = input_frames(noisy.shape[1], parity)
    return np.ascontiguousarray(noisy[:, seen]), np.ascontiguousarray(target[:, seen])


__all__ = ["FLOW_RADIUS", "MOTIONS", "between_frames", "flow", "frames_seen", "input_frames", "neighbours",
           "training_batch", "warp"]
