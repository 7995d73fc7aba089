"""The reference implementation's own network, for timing it side by side with napari-cnnt's.

Only ``models/model.py`` of a CNNT_Microscopy checkout is imported (it needs
nothing but torch); the denoiser around its U-net is assembled as the
reference's ``CNNT_enhanced_denoising_runtime`` assembles it, whose
constructor would also set up training. napari-cnnt's weights are loaded into
it (the state dict keys are the reference's), so both compute the same
function and their outputs can be compared.

    git clone https://github.com/AzR919/CNNT_Microscopy /tmp/CNNT_Microscopy
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import torch
from torch import nn


def _module(root: Path, relative: str = "models/model.py"):
    """Import one file of a CNNT_Microscopy checkout by its path."""
    path = Path(root) / relative
    if not path.is_file():
        raise SystemExit(f"{root}: not a CNNT_Microscopy checkout (no {relative})")
    spec = importlib.util.spec_from_file_location("cnnt_reference_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ReferenceDenoiser(nn.Module):
    """``pre_cnnt -> CNNTUnet -> pos_cnnt`` built from the reference's classes."""

    def __init__(self, root: Path, config):
        super().__init__()
        m = _module(root)
        k, p = config.kernel_size, config.padding
        c1, c2 = config.pre_channels
        def conv(a, b):
            return m.Conv2DExt(a, b, kernel_size=k, stride=1, padding=p, bias=True)
        self.no_residual = config.no_residual
        self.pre_cnnt = nn.Sequential(conv(1, c1), conv(c1, c2))
        with contextlib.redirect_stdout(io.StringIO()):  # its U-net prints its norm modes
            self.cnnt = m.CNNTUnet(
                blocks=list(config.blocks), blocks_per_set=config.blocks_per_set, H=config.height,
                W=config.width, C_in=c2, T=config.time, C_out=c2, n_head=config.n_head,
                norm_mode=config.norm_mode, kernel_size=(k, k), stride=(1, 1), padding=(p, p),
                dropout_p=config.dropout_p, with_mixer=config.with_mixer,
            )
        self.pos_cnnt = nn.Sequential(conv(c2, c1), conv(c1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_cnnt(x)
        noise = self.cnnt(pre)
        return self.pos_cnnt(noise if self.no_residual else pre - noise)


def reference_network(root: Path, model: nn.Module) -> ReferenceDenoiser:
    """The reference's network holding ``model``'s weights, in eval mode, float32."""
    net = ReferenceDenoiser(root, model.config)
    missing, unexpected = net.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("attn.mask")]  # the reference's causal-mask buffers
    if missing or unexpected:
        raise RuntimeError(f"state dicts differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return net.eval().requires_grad_(False)


def reference_inference(root: Path):
    """The reference's whole-image inference function (``running_inference.py``)."""
    return _module(root, "running_inference.py").running_inference
