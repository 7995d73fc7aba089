"""The blind-spot objective: learning to denoise from noisy stacks alone (Noise2Void, N2V2).

Some pixels are hidden from the network and the loss is computed at those
pixels only, against their noisy values: since the noise of a pixel is
independent of everything the network sees, the best prediction of its noisy
value is its clean value. One pixel per ``grid x grid`` box of every frame is
hidden (:func:`draw_mask`), replaced by the value of a random neighbour in the
same frame (within a 5 x 5 window, never itself nor another hidden pixel).
The same pixel in the other frames stays visible: its noise is independent
too, so it is legitimate evidence, and it is what a time-lapse model adds
over a single-frame Noise2Void. A neighbour's noisy value rather than a local
median (N2V2's choice) keeps the input at a hidden pixel as noisy as at any
other: with the smoother median the network learns to trust the centre pixel
more than its noise warrants, and its ordinary output, where every pixel is
visible, got worse while its blind predictions did not improve
(``benchmarks/bench_selfsupervised.py``). N2V2's checkerboard artefacts came
from copies that may include the pixel itself, which this never uses. No
input value carries a hidden pixel's value, so the loss has no gradient with
respect to it.

For time-lapse stacks the interlaced objective
(:mod:`~napari_cnnt.training.interlace`) learns more from the same data; this
one is for single frames, and for comparison.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Neighbourhood a hidden pixel's replacement is drawn from: a (2 * RADIUS + 1)^2 window.
RADIUS = 2
WINDOW = (2 * RADIUS + 1) ** 2
CENTRE = WINDOW // 2
VISIBLE = -1


def grid_for(fraction: float) -> int:
    """The box edge of stratified sampling that hides about ``fraction`` of the pixels."""
    if not 0 < fraction <= 0.25:
        raise ValueError(f"the fraction of hidden pixels must be in (0, 0.25], got {fraction!r}")
    return max(2, round(1 / math.sqrt(fraction)))


def draw_mask(shape: tuple[int, ...], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Which pixels to hide and what replaces them, an int8 array of ``shape`` (``[..., H, W]``):
    :data:`VISIBLE` (-1), or for a hidden pixel the index in its flattened 5 x 5 window of the
    neighbour whose value replaces it (never :data:`CENTRE`). One pixel is hidden at random in
    every ``grid x grid`` box of every frame (boxes cut by the edge hide one when it falls inside);
    ``mask >= 0`` is the boolean mask."""
    g = grid_for(fraction)
    *lead, H, W = shape
    n = int(np.prod(lead)) if lead else 1
    by, bx = -(-H // g), -(-W // g)
    dy = rng.integers(0, g, (n, by, bx))
    dx = rng.integers(0, g, (n, by, bx))
    ys = np.arange(by)[None, :, None] * g + dy
    xs = np.arange(bx)[None, None, :] * g + dx
    frame = np.broadcast_to(np.arange(n)[:, None, None], ys.shape)
    inside = (ys < H) & (xs < W)
    mask = np.full((n, H, W), VISIBLE, np.int8)
    pick = rng.integers(0, WINDOW - 1, int(inside.sum()))
    mask[frame[inside], ys[inside], xs[inside]] = pick + (pick >= CENTRE)  # skip the centre
    return mask.reshape(shape)


def hide(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with the pixels hidden by ``mask`` (from :func:`draw_mask`) replaced by the neighbour
    each names; a neighbour that is hidden too is passed over for the next visible one in the
    window, and a pixel whose whole window is hidden takes the mean of its frame's visible pixels.

    Works on ``[..., H, W]``; the result carries no information about, and no gradient to, the
    hidden values: ``torch.where`` takes them from the replacement only.
    """
    if mask.shape != x.shape:
        raise ValueError(f"the mask must have the input's shape {list(x.shape)}, got {list(mask.shape)}")
    H, W = x.shape[-2:]
    frames = x.reshape(-1, H, W)
    picks = mask.reshape(-1, H, W).long()
    hidden = picks >= 0
    n, ys, xs = torch.nonzero(hidden, as_tuple=True)
    if n.numel() == 0:
        return x
    r = RADIUS
    offsets = torch.arange(-r, r + 1, device=x.device)
    # Neighbour coordinates, mirrored at the edges (reflection without repeating the edge pixel).
    yy = (ys[:, None, None] + offsets[None, :, None]).expand(-1, -1, 2 * r + 1)
    xx = (xs[:, None, None] + offsets[None, None, :]).expand(-1, 2 * r + 1, -1)
    yy = _reflect(yy, H).reshape(len(n), -1)
    xx = _reflect(xx, W).reshape(len(n), -1)
    nn = n[:, None].expand_as(yy)
    usable = ~hidden[nn, yy, xx]  # the centre is hidden itself, so never used
    code = picks[n, ys, xs]
    # The named neighbour, or the next usable one after it in the window.
    order = torch.remainder(torch.arange(WINDOW, device=x.device)[None] - code[:, None], WINDOW)
    chosen = torch.where(usable, order, torch.full_like(order, WINDOW)).argmin(dim=1)
    rows = torch.arange(len(n), device=x.device)
    values = frames.detach()[nn[rows, chosen], yy[rows, chosen], xx[rows, chosen]]
    lonely = ~usable.any(dim=1)
    if lonely.any():  # a window entirely hidden (tiny grids only)
        values[lonely] = torch.stack([frames[i].detach()[~hidden[i]].mean() for i in n[lonely]]).to(values.dtype)
    replaced = torch.zeros_like(frames)
    replaced[n, ys, xs] = values.to(frames.dtype)
    return torch.where(hidden, replaced, frames).reshape(x.shape)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    if size == 1:
        return torch.zeros_like(i)
    period = 2 * (size - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= size, period - i, i)


def masked_loss(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                count: float | None = None) -> torch.Tensor:
    """Mean squared error at the hidden pixels, against their noisy values (float32).

    ``count`` divides the sum instead of the number of hidden pixels here: a process of a
    data-parallel run passes the whole batch's count over the processes, so that the averaged
    gradients are those of one process running the whole batch.
    """
    m = mask.to(output.device) >= 0
    count = float(m.sum()) if count is None else float(count)
    if count == 0:
        return output.new_zeros((), dtype=torch.float32)
    diff = (output.float() - target.float())[m]
    return diff.square().sum() / count


__all__ = ["RADIUS", "VISIBLE", "draw_mask", "grid_for", "hide", "masked_loss"]
