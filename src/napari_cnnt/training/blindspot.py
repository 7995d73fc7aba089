"""The blind-spot objective: learning to denoise from noisy stacks alone (Noise2Void, N2V2).

A few pixels of every frame are hidden from the network: each is replaced by
the median of its neighbours in the same frame, the hidden pixels
themselves left out, so no replaced value carries a hidden pixel's value.
The loss is computed at the hidden pixels only, against their noisy values:
since the noise of a pixel is independent of everything the network sees,
the best prediction of its noisy value is its clean value. The same pixel in
the other frames stays visible: its noise is independent too, so it is
legitimate evidence, and it is what a time-lapse model adds over a
single-frame Noise2Void.

The hidden pixels are drawn by stratified sampling (one per ``grid x grid``
box of every frame) so they are spread evenly. Replacing them with a median
that leaves the centre out, rather than with a random neighbour as the first
Noise2Void did, avoids the checkerboard artefacts N2V2 traced to copies of
neighbouring pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Neighbourhood whose median replaces a hidden pixel: a (2 * RADIUS + 1)^2 window.
RADIUS = 2


def grid_for(fraction: float) -> int:
    """The box edge of stratified sampling that hides about ``fraction`` of the pixels."""
    if not 0 < fraction <= 0.25:
        raise ValueError(f"the fraction of hidden pixels must be in (0, 0.25], got {fraction!r}")
    return max(2, round(1 / math.sqrt(fraction)))


def draw_mask(shape: tuple[int, ...], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of ``shape`` (``[..., H, W]``): one pixel hidden at random in every
    ``grid x grid`` box of every frame (boxes cut by the edge hide a pixel when it falls inside)."""
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
    mask = np.zeros((n, H, W), bool)
    mask[frame[inside], ys[inside], xs[inside]] = True
    return mask.reshape(shape)


def hide(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with the pixels in ``mask`` replaced by the median of their unhidden neighbours in
    the same frame (the nearest unhidden pixel's value when a whole neighbourhood is hidden).

    Works on ``[..., H, W]``; the result carries no information about, and no gradient to, the
    hidden values: ``torch.where`` takes them from the replacement only.
    """
    if mask.shape != x.shape:
        raise ValueError(f"the mask must have the input's shape {list(x.shape)}, got {list(mask.shape)}")
    H, W = x.shape[-2:]
    frames = x.reshape(-1, H, W)
    hidden = mask.reshape(-1, H, W)
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
    values = frames.detach()[nn, yy, xx].float()
    values = values.masked_fill(hidden[nn, yy, xx], float("nan"))
    median = values.nanmedian(dim=1).values
    lonely = torch.isnan(median)
    if lonely.any():  # a neighbourhood entirely hidden (tiny grids only): widen to the frame
        median[lonely] = torch.stack([frames[i].detach()[~hidden[i]].float().median() for i in n[lonely]])
    replaced = torch.zeros_like(frames)
    replaced[n, ys, xs] = median.to(frames.dtype)
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
    m = mask.to(output.device)
    count = float(m.sum()) if count is None else float(count)
    if count == 0:
        return output.new_zeros((), dtype=torch.float32)
    diff = (output.float() - target.float())[m]
    return diff.square().sum() / count


__all__ = ["RADIUS", "draw_mask", "grid_for", "hide", "masked_loss"]
