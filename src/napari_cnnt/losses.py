"""Training losses and reporting metrics for ``[B, T, 1, H, W]`` stacks in [0, 1].

The formulas follow the reference implementation (``docs/cnnt.md``
section 6), including its size normalisation ``s = H*W/4096`` so that loss
values and loss weights carry over from the reference's recipes. Losses are
always computed in float32, also when the network runs in bfloat16.

Each loss takes optional ``weights``: ``[B]`` per sample or ``[B, T]`` per
frame, normalised by their sum as in the reference.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossFn = Callable[..., Tensor]


def _check(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    if outputs.shape != targets.shape or outputs.ndim != 5 or outputs.shape[2] != 1:
        raise ValueError(
            f"losses expect outputs and targets of equal shape [B, T, 1, H, W], "
            f"got {list(outputs.shape)} and {list(targets.shape)}"
        )
    return outputs.float(), targets.float()


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with a finite gradient at 0 (where the true one is infinite)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _frame_weights(weights: Tensor, B: int, T: int) -> Tensor:
    """Weights as one value per frame, ``[B*T]``."""
    if weights.ndim == 1 and weights.shape[0] == B:
        return weights.float().repeat_interleave(T)
    if weights.shape == (B, T):
        return weights.float().reshape(B * T)
    raise ValueError(f"weights must have shape [B]={[B]} or [B, T]={[B, T]}, got {list(weights.shape)}")


def _weighted_sum(per_frame: Tensor, weights: Tensor | None, B: int, T: int, per_sample_norm: bool) -> Tensor:
    """Sum of ``per_frame`` values ``[B*T]``; weighted and divided by the weights' sum if given.

    ``per_sample_norm``: per-sample weights are summed once per sample (the
    reference does this for mse and l1) rather than once per frame.
    """
    if weights is None:
        return per_frame.sum()
    w = _frame_weights(weights, B, T)
    denominator = weights.float().sum() if (per_sample_norm and weights.ndim == 1) else w.sum()
    return (w * per_frame).sum() / denominator


def mse_loss(outputs: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """``sqrt(sum((o - t)^2)) / (B*T) / (H*W/4096)``."""
    o, t = _check(outputs, targets)
    B, T, _, H, W = o.shape
    per_frame = (o - t).square().reshape(B * T, -1).sum(1)
    return _safe_sqrt(_weighted_sum(per_frame, weights, B, T, True)) / (B * T) / (H * W / 4096)


def l1_loss(outputs: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """``sum(|o - t|) / (B*T) / (H*W/4096)``."""
    o, t = _check(outputs, targets)
    B, T, _, H, W = o.shape
    per_frame = (o - t).abs().reshape(B * T, -1).sum(1)
    return _weighted_sum(per_frame, weights, B, T, True) / (B * T) / (H * W / 4096)


@functools.cache
def _sobel_kernels(device: torch.device) -> Tensor:
    gx = torch.tensor([[2.0, 0.0, -2.0], [4.0, 0.0, -4.0], [2.0, 0.0, -2.0]])
    gy = torch.tensor([[2.0, 4.0, 2.0], [0.0, 0.0, 0.0], [-2.0, -4.0, -2.0]])
    return torch.stack([gx, gy]).unsqueeze(1).to(device)


def sobel_magnitude(frames: Tensor) -> Tensor:
    """Gradient magnitude of ``[N, 1, H, W]`` frames, zero padding."""
    g = F.conv2d(frames.float(), _sobel_kernels(frames.device), padding=1)
    return _safe_sqrt(g.square().sum(1, keepdim=True))


def sobel_loss(outputs: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """The mse formula applied to Sobel gradient magnitudes (edges)."""
    o, t = _check(outputs, targets)
    B, T, _, H, W = o.shape
    diff = (sobel_magnitude(o.reshape(B * T, 1, H, W)) - sobel_magnitude(t.reshape(B * T, 1, H, W))).square()
    per_frame = diff.reshape(B * T, -1).sum(1)
    return _safe_sqrt(_weighted_sum(per_frame, weights, B, T, False)) / (B * T) / (H * W / 4096)


# ----------------------------------------------------------------------------- SSIM
SSIM_WINDOW = 7
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


@functools.cache
def _gaussian_1d(device: torch.device) -> Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=torch.float32) - SSIM_WINDOW // 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return (g / g.sum()).to(device)


def _ssim_map(x: Tensor, y: Tensor, blur: Callable[[Tensor], Tensor]) -> Tensor:
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x * mu_x
    syy = blur(y * y) - mu_y * mu_y
    sxy = blur(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + SSIM_C1) * (2 * sxy + SSIM_C2)) / (
        (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (sxx + syy + SSIM_C2)
    )


def ssim_per_frame(outputs: Tensor, targets: Tensor) -> Tensor:
    """SSIM of every frame, ``[B, T]``: 7x7 Gaussian window (sigma 1.5), zero padding."""
    o, t = _check(outputs, targets)
    B, T, _, H, W = o.shape
    g = _gaussian_1d(o.device)
    window = (g[:, None] * g[None, :])[None, None]

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(z, window, padding=SSIM_WINDOW // 2)

    m = _ssim_map(o.reshape(B * T, 1, H, W), t.reshape(B * T, 1, H, W), blur)
    return m.reshape(B, T, -1).mean(-1)


def ssim3d_per_sample(outputs: Tensor, targets: Tensor) -> Tensor:
    """SSIM over (T, H, W) of every sample, ``[B]``: 7x7x7 Gaussian window, zero padding."""
    o, t = _check(outputs, targets)
    g = _gaussian_1d(o.device)
    window = (g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]

    def blur(z: Tensor) -> Tensor:
        return F.conv3d(z, window, padding=SSIM_WINDOW // 2)

    m = _ssim_map(o.transpose(1, 2), t.transpose(1, 2), blur)  # [B, 1, T, H, W]
    return m.reshape(m.shape[0], -1).mean(-1)


def ssim_loss(outputs: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """``1 - mean SSIM`` over frames (weighted mean if ``weights`` are given)."""
    s = ssim_per_frame(outputs, targets)
    B, T = s.shape
    if weights is None:
        return 1.0 - s.mean()
    return 1.0 - _weighted_sum(s.reshape(-1), weights, B, T, False)


def ssim3d_loss(outputs: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """``1 - mean SSIM`` over samples, each measured in (T, H, W)."""
    s = ssim3d_per_sample(outputs, targets)
    if weights is None:
        return 1.0 - s.mean()
    if weights.shape != s.shape:
        raise ValueError(f"ssim3D takes one weight per sample, shape {list(s.shape)}; got {list(weights.shape)}")
    w = weights.float()
    return 1.0 - (w * s).sum() / w.sum()


LOSSES: dict[str, LossFn] = {
    "mse": mse_loss,
    "l1": l1_loss,
    "sobel": sobel_loss,
    "ssim": ssim_loss,
    "ssim3D": ssim3d_loss,
}


class CombinedLoss:
    """A weighted sum of named losses, e.g. ``CombinedLoss(["ssim", "mse"], [1.0, 0.1])``."""

    def __init__(self, names: Sequence[str] | str, weights: Sequence[float] | None = None):
        names = [names] if isinstance(names, str) else list(names)
        weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
        if not names:
            raise ValueError("at least one loss is needed")
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} losses but {len(weights)} weights: give one weight per loss")
        lookup = {k.lower(): k for k in LOSSES}
        canonical = []
        for n in names:
            if n.lower() not in lookup:
                raise ValueError(f"unknown loss {n!r}; choose from {', '.join(LOSSES)}")
            canonical.append(lookup[n.lower()])
        for w in weights:
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"loss weights must be finite and non-negative, got {w}")
        self.names = canonical
        self.weights = weights

    def __call__(self, outputs: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
        total = outputs.new_zeros((), dtype=torch.float32)
        for name, w in zip(self.names, self.weights):
            total = total + w * LOSSES[name](outputs, targets, weights)
        return total

    def __repr__(self) -> str:
        terms = " + ".join(f"{w:g}*{n}" for n, w in zip(self.names, self.weights))
        return f"CombinedLoss({terms})"


# ----------------------------------------------------------------------------- metrics
def psnr(outputs: Tensor, targets: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB over the whole batch (data in [0, data_range])."""
    mse = (outputs.float() - targets.float()).square().mean()
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean per-frame SSIM (the ``ssim`` loss's measure), for reporting."""
    return ssim_per_frame(outputs, targets).mean()
