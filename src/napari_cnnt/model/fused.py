"""Inference-only forms of CNNT modules: the same function with less memory traffic.

``Runtime.inference_copy`` swaps them into a frozen copy on the fast path;
trained modules and checkpoints never see them. On the CPU the network's
convolutions already run near the machine's peak, so what is left to gain is
in the element-wise work and in the data that has to leave the cache.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CNNTBlock, FrameConv, _frames, _is_channels_last, _unframes


def _onednn_conv_gelu_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's convolution with a fused exact GELU runs (and agrees with the
    plain one) for ``dtype`` in this build of PyTorch on this CPU; it is a private
    operator, and its bf16 form needs hardware support, so both are probed."""
    if dtype == torch.bfloat16:
        from .. import runtime

        return runtime.cpu_runs_bf16()
    return dtype == torch.float32 and _float32_conv_gelu_runs()


@functools.cache
def _float32_conv_gelu_runs() -> bool:
    op = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 6, 6, generator=gen)
        w = torch.randn(8, 4, 3, 3, generator=gen)
        b = torch.randn(8, generator=gen)
        with torch.inference_mode():
            fused = op(x, w, b, [1, 1], [1, 1], [1, 1], 1, "gelu", [], "none")
            plain = F.gelu(F.conv2d(x, w, b, padding=1))
        return bool(torch.allclose(fused, plain, rtol=1e-4, atol=1e-4))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class FusedMixer(nn.Sequential):
    """A block's mixer, ``conv -> GELU -> conv``, for inference on the CPU.

    The GELU runs inside the first convolution as a oneDNN post-op (on the
    float32 accumulator, before rounding to bf16), which saves a full pass over
    the four-times-wider intermediate. Frames go through a few at a time, so
    that intermediate stays in cache instead of being written to memory and
    read back. On a GPU, or in builds without the operator, it runs the plain
    modules on all frames at once. It holds the mixer's own modules, so state
    dict keys do not change.
    """

    cache_bytes = 16 << 20  # intermediate per chunk; 8-16 MB ran fastest on the development CPU

    def __init__(self, mlp: nn.Sequential):
        kinds = [type(m) for m in mlp]
        if kinds[:3] != [FrameConv, nn.GELU, FrameConv] or mlp[1].approximate != "none":
            raise TypeError("FusedMixer takes a CNNT block's mixer: FrameConv, GELU, FrameConv, Dropout")
        super().__init__(*mlp)

    @property
    def expand(self) -> nn.Conv2d:
        return self[0].conv2d

    @property
    def project(self) -> nn.Conv2d:
        return self[2].conv2d

    def frames_per_chunk(self, frames: torch.Tensor) -> int:
        """On a CPU, as many frames as keep the intermediate within ``cache_bytes``;
        on a GPU all of them, since many small launches would cost more than they save."""
        n, _, h, w = frames.shape
        if frames.device.type != "cpu":
            return n
        return max(1, self.cache_bytes // (self.expand.out_channels * h * w * frames.element_size()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = _frames(x)
        n, _, h, w = frames.shape
        step = self.frames_per_chunk(frames)
        if step >= n:
            return _unframes(self._mix(frames), x.shape[0], x.shape[1])
        layout = torch.channels_last if _is_channels_last(frames) else torch.contiguous_format
        out = torch.empty((n, self.project.out_channels, h, w), dtype=frames.dtype, device=frames.device,
                          memory_format=layout)
        for i in range(0, n, step):
            out[i:i + step] = self._mix(frames[i:i + step])
        return _unframes(out, x.shape[0], x.shape[1])

    def _mix(self, frames: torch.Tensor) -> torch.Tensor:
        conv = self.expand
        if frames.device.type == "cpu" and _onednn_conv_gelu_available(frames.dtype):
            hidden = torch.ops.mkldnn._convolution_pointwise(
                frames, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
                conv.groups, "gelu", [], "none",
            )
        else:
            hidden = F.gelu(conv(frames))
        return self.project(hidden)


def fuse_mixers(net: nn.Module) -> nn.Module:
    """Replace every CNNT block's mixer in ``net`` (in place) by a :class:`FusedMixer`."""
    for module in net.modules():
        if isinstance(module, CNNTBlock) and module.with_mixer and not isinstance(module.mlp, FusedMixer):
            module.mlp = FusedMixer(module.mlp)
    return net


__all__ = ["FusedMixer", "fuse_mixers"]
