"""CNNT building blocks: frame convolution, attention across time, block, block set, U-net.

Every module takes and returns ``[B, T, C, H, W]`` tensors. Internally the
work is done on ``[B*T, C, H, W]`` frames, which are views of the same memory,
so channels-last layouts survive from one convolution to the next.

Module and attribute names follow the reference implementation so that its
state dicts load with strict key checking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CNNTConfig


def _frames(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(0, 1)


def _unframes(y: torch.Tensor, batch: int, time: int) -> torch.Tensor:
    return y.unflatten(0, (batch, time))


def _is_channels_last(frames: torch.Tensor) -> bool:
    """Whether ``[N, C, H, W]`` frames lie channels-last (and not also in the default layout)."""
    return not frames.is_contiguous() and frames.is_contiguous(memory_format=torch.channels_last)


class FrameConv(nn.Module):
    """A 2-D convolution applied to every frame independently."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.conv2d = nn.Conv2d(c_in, c_out, kernel_size, stride=1, padding=padding, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _unframes(self.conv2d(_frames(x)), x.shape[0], x.shape[1])


class CNNTAttention(nn.Module):
    """Multi-head attention between time points; each time point is a whole feature map.

    Queries, keys and values come from convolutions, so the parameter count does
    not grow with the image size. The three projections run as one convolution
    with concatenated weights; they stay separate parameters for checkpoint
    compatibility. :meth:`fuse_projections` stores the concatenation once for
    inference, where concatenating (and casting) on every call costs more than
    the attention itself.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        n_head: int = 8,
        kernel_size: int = 3,
        padding: int = 1,
        dropout_p: float = 0.1,
        is_causal: bool = False,
    ):
        super().__init__()
        if c_out % n_head:
            raise ValueError(f"output channels ({c_out}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.is_causal = is_causal
        self.padding = padding
        self.key = FrameConv(c_in, c_out, kernel_size, padding)
        self.query = FrameConv(c_in, c_out, kernel_size, padding)
        self.value = FrameConv(c_in, c_out, kernel_size, padding)
        self.output_proj = FrameConv(c_out, c_out, kernel_size, padding)
        self.attn_drop = nn.Dropout(dropout_p)
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def fuse_projections(self) -> None:
        """Freeze the joint q/k/v weights; later changes to the separate weights are not seen."""
        convs = (self.query.conv2d, self.key.conv2d, self.value.conv2d)
        with torch.no_grad():
            self.qkv_weight = torch.cat([c.weight for c in convs])
            self.qkv_bias = torch.cat([c.bias for c in convs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        if self.qkv_weight is not None:
            weight, bias = self.qkv_weight, self.qkv_bias
        else:
            convs = (self.query.conv2d, self.key.conv2d, self.value.conv2d)
            weight = torch.cat([c.weight for c in convs])
            bias = torch.cat([c.bias for c in convs])
        qkv = F.conv2d(_frames(x), weight, bias, padding=self.padding)
        C, H, W = qkv.shape[1] // 3, qkv.shape[2], qkv.shape[3]
        nh = self.n_head
        hc = C // nh
        D = hc * H * W
        # Each head's queries, keys and values become [B, nh, T, D] matrices. The
        # order of the D features is free (only their dot products count), so it
        # follows the memory layout: (channel, pixel) for contiguous tensors and
        # (pixel, channel) for channels-last ones. Each copy then moves runs of
        # neighbouring values, and a channels-last result needs no second copy.
        channels_last = _is_channels_last(qkv)
        if channels_last:  # [B*T, H, W, 3*C] in memory -> [3, B, nh, T, H*W*hc]
            qkv = qkv.permute(0, 2, 3, 1).unflatten(0, (B, T)).unflatten(-1, (3, nh, hc))
            qkv = qkv.permute(4, 0, 5, 1, 2, 3, 6)
        else:  # [B*T, 3*C, H, W] -> [3, B, nh, T, hc*H*W]
            qkv = qkv.unflatten(0, (B, T)).unflatten(2, (3, nh, hc)).permute(2, 0, 3, 1, 4, 5, 6)
        q, k, v = qkv.reshape(3, B, nh, T, D).unbind(0)

        att = (q @ k.transpose(-2, -1)).float() * D**-0.5  # a traced size under torch.jit.trace
        if self.is_causal:
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(future, float("-inf"))
        att = self.attn_drop(att.softmax(dim=-1)).to(v.dtype)

        y = att @ v  # [B, nh, T, D]
        if channels_last:  # -> [B*T, H, W, C] in memory, seen as [B*T, C, H, W]
            y = y.unflatten(-1, (H, W, hc)).permute(0, 2, 3, 4, 1, 5).reshape(B * T, H, W, C).permute(0, 3, 1, 2)
        else:
            y = y.unflatten(-1, (hc, H, W)).transpose(1, 2).reshape(B * T, C, H, W)
        return _unframes(self.output_proj.conv2d(y), B, T)


class InstanceNorm(nn.Module):
    """Instance norm of every frame (no affine, no running statistics).

    Computed as a group norm with one channel per group. PyTorch's CPU group
    norm backward is several times slower on channels-last tensors, so in
    training those are normalised in the default layout and converted back.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        channels = frames.shape[1]
        if frames.requires_grad and frames.device.type == "cpu" and _is_channels_last(frames):
            y = F.group_norm(frames.contiguous(), channels, eps=self.eps)
            return y.contiguous(memory_format=torch.channels_last)
        return F.group_norm(frames, channels, eps=self.eps)


def _make_norm(mode: str, channels: int, height: int, width: int) -> nn.Module:
    if mode == "layer":
        return nn.LayerNorm([channels, height, width])
    if mode == "batch":
        return nn.BatchNorm2d(channels)
    return InstanceNorm()


class CNNTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mixer(norm2(x))``."""

    _NORM_PREFIX = {"layer": "ln", "batch": "bn", "instance": "in"}

    def __init__(
        self,
        channels: int,
        norm_mode: str,
        height: int,
        width: int,
        n_head: int = 8,
        kernel_size: int = 3,
        padding: int = 1,
        dropout_p: float = 0.1,
        is_causal: bool = False,
        with_mixer: bool = True,
    ):
        super().__init__()
        self.norm_mode = norm_mode
        prefix = self._NORM_PREFIX[norm_mode]
        self._norm_names = (f"{prefix}1", f"{prefix}2")
        for name in self._norm_names:
            self.add_module(name, _make_norm(norm_mode, channels, height, width))
        self.attn = CNNTAttention(
            channels, channels, n_head, kernel_size, padding, dropout_p, is_causal
        )
        self.with_mixer = with_mixer
        if with_mixer:
            self.mlp = nn.Sequential(
                FrameConv(channels, 4 * channels, kernel_size, padding),
                nn.GELU(),
                FrameConv(4 * channels, channels, kernel_size, padding),
                nn.Dropout(dropout_p),
            )

    def _norm(self, index: int, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(self, self._norm_names[index])
        if self.norm_mode == "layer":
            return norm(x)  # normalises the trailing [C, H, W]
        return _unframes(norm(_frames(x)), x.shape[0], x.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self._norm(0, x))
        if self.with_mixer:
            x = x + self.mlp(self._norm(1, x))
        return x


class BlockSet(nn.Module):
    """An input projection, ``blocks_per_set`` CNNT blocks, and a resampled copy of the result.

    ``resample`` is ``"down"`` (half size), ``"up"`` (double size) or
    ``"none"``. Down-sampling is 2x2 averaging and up-sampling bilinear
    (``align_corners=False``): exactly what the reference's trilinear
    interpolation with scales ``(1, 0.5, 0.5)`` and ``(1, 2, 2)`` computes.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        resample: str,
        norm_mode: str,
        height: int,
        width: int,
        config: CNNTConfig,
    ):
        super().__init__()
        if resample not in ("down", "up", "none"):
            raise ValueError(f"resample must be 'down', 'up' or 'none', got {resample!r}")
        k, p = config.kernel_size, config.padding
        self.resample = resample
        self.input_proj = FrameConv(c_in, c_out, k, p)
        self.blocks = nn.Sequential(
            *[
                CNNTBlock(
                    c_out, norm_mode, height, width, config.n_head, k, p,
                    config.dropout_p, config.is_causal, config.with_mixer,
                )
                for _ in range(config.blocks_per_set)
            ]
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.blocks(self.input_proj(x))
        if self.resample == "none":
            return x, x
        B, T = x.shape[:2]
        if self.resample == "down":
            r = F.avg_pool2d(_frames(x), 2)
        else:
            r = F.interpolate(_frames(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return x, _unframes(r, B, T)


def _cat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Concatenate as frames so a channels-last layout is kept.
    return _unframes(torch.cat([_frames(a), _frames(b)], dim=1), a.shape[0], a.shape[1])


class CNNTUnet(nn.Module):
    """The CNNT U-net with 2 to 4 levels (``docs/cnnt.md`` section 4).

    Block sets are named ``down1..``, ``up1..`` and ``final`` as in the
    reference; skip connections concatenate the up-sampled tensor first.
    """

    def __init__(self, config: CNNTConfig, c_in: int, c_out: int):
        super().__init__()
        b = config.blocks
        L = config.levels
        modes = iter(config.norm_modes())
        H, W = config.height, config.width

        self._down_names = [f"down{i}" for i in range(1, L)]
        self._up_names = [f"up{j}" for j in range(1, L)]

        prev = c_in
        for i, name in enumerate(self._down_names):
            scale = 2**i
            setattr(self, name, BlockSet(prev, b[i], "down", next(modes), H // scale, W // scale, config))
            prev = b[i]
        # Bottom of the U: runs on the last down-sampled tensor.
        bottom = 2 ** (L - 1)
        self.up1 = BlockSet(b[L - 2], b[L - 1], "up", next(modes), H // bottom, W // bottom, config)
        up_out = b[L - 1]
        for j in range(2, L):
            scale = 2 ** (L - j)
            skip = b[L - j]
            out = b[L - j + 1]
            setattr(self, f"up{j}", BlockSet(up_out + skip, out, "up", next(modes), H // scale, W // scale, config))
            up_out = out
        self.final = BlockSet(up_out + b[0], b[1], "none", next(modes), H, W, config)
        self.output_proj = FrameConv(b[1], c_out, config.kernel_size, config.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for name in self._down_names:
            skip, x = getattr(self, name)(x)
            skips.append(skip)
        _, x = self.up1(x)
        for j, name in enumerate(self._up_names[1:]):
            _, x = getattr(self, name)(_cat_channels(x, skips[-1 - j]))
        x, _ = self.final(_cat_channels(x, skips[0]))
        return self.output_proj(x)
