"""The CNNT denoiser: two convolutions in, a CNNT U-net predicting noise, two convolutions out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..normalization import Normalization
from .config import CNNTConfig
from .layers import CNNTUnet, FrameConv


class CNNTDenoiser(nn.Module):
    """Maps a normalised ``[B, T, 1, H, W]`` float stack to its denoised version.

    The U-net predicts the noise in a 32-channel embedding of the input,
    which is subtracted before projecting back to one channel (unless
    ``config.no_residual``). H and W must be multiples of
    ``config.size_multiple``; ``napari_cnnt.denoise`` pads arbitrary sizes.

    ``normalization`` and ``metadata`` travel with the model through
    ``save_model``/``load_model``: the intensity scaling the model expects and
    its provenance.

    ``config`` may also be given as its dict (``CNNTConfig.to_dict()``), so
    that ``CNNTDenoiser(config={...})`` builds the network from plain values,
    as bioimage.io tools do from a package's architecture description.
    """

    def __init__(self, config: CNNTConfig | Mapping[str, Any] | None = None):
        super().__init__()
        if isinstance(config, Mapping):
            config = CNNTConfig.from_dict(dict(config))
        self.config = config or CNNTConfig()
        c1, c2 = self.config.pre_channels
        k, p = self.config.kernel_size, self.config.padding
        self.pre_cnnt = nn.Sequential(FrameConv(1, c1, k, p), FrameConv(c1, c2, k, p))
        self.cnnt = CNNTUnet(self.config, c2, c2)
        self.pos_cnnt = nn.Sequential(FrameConv(c2, c1, k, p), FrameConv(c1, 1, k, p))
        self.normalization = Normalization()
        self.metadata: dict[str, Any] = {}

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[2] != 1:
            raise ValueError(f"CNNT expects a [B, T, 1, H, W] tensor, got shape {list(x.shape)}")
        self.config.check_frame_size(*x.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        pre = self.pre_cnnt(x)
        noise = self.cnnt(pre)
        out = noise if self.config.no_residual else pre - noise
        return self.pos_cnnt(out)
