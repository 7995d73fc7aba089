"""Layer-sequential unit-variance (LSUV) initialisation.

Mishkin & Matas, "All you need is a good init" (ICLR 2016): start from
orthonormal weights, then, layer by layer from the input onwards, rescale
each layer's weights until its output on a real batch has unit variance.
Deep networks then start training with well-scaled activations everywhere,
which the reference relies on when training from scratch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.layers import CNNTAttention

TOLERANCE = 0.1
MAX_ITERATIONS = 10


class _Observed(Exception):
    """Raised from a hook to end a forward pass once the layer of interest has run."""


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear))]


def _fused_projections(model: nn.Module) -> dict[nn.Module, tuple[CNNTAttention, nn.Module]]:
    """Attention's query/key/value convolutions run fused, never through their own forward;
    their output is computed from the attention's input instead."""
    fused = {}
    for attn in model.modules():
        if isinstance(attn, CNNTAttention):
            for proj in (attn.query, attn.key, attn.value):
                fused[proj.conv2d] = (attn, proj)
    return fused


def _output_variance(model: nn.Module, layer: nn.Module, fused: dict, x: torch.Tensor) -> float | None:
    """Variance of ``layer``'s output during a forward pass of ``x`` (None if it never runs)."""
    seen: list[torch.Tensor] = []

    def record(output: torch.Tensor) -> None:
        seen.append(output.detach().float())
        raise _Observed

    if layer in fused:
        attn, proj = fused[layer]
        handle = attn.register_forward_pre_hook(lambda _m, args: record(proj(args[0])))
    else:
        handle = layer.register_forward_hook(lambda _m, _args, out: record(out))
    try:
        model(x)
    except _Observed:
        pass
    finally:
        handle.remove()
    return float(seen[0].var()) if seen else None


@torch.no_grad()
def lsuv_init(
    model: nn.Module,
    x: torch.Tensor,
    tolerance: float = TOLERANCE,
    max_iterations: int = MAX_ITERATIONS,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Initialise ``model`` in place with LSUV on the batch ``x``; returns the layers adjusted.

    Convolution and linear weights become orthonormal (per output channel)
    and biases zero, then each layer, in the order the forward pass runs
    them, is divided by the standard deviation of its output until that
    variance is within ``tolerance`` of 1. Batch-norm statistics gathered on
    the way are restored afterwards.
    """
    names = {m: n for n, m in model.named_modules()}
    layers = _layers(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    for layer in layers:
        w = torch.empty(layer.weight.shape[0], layer.weight[0].numel())
        nn.init.orthogonal_(w, generator=generator)
        layer.weight.copy_(w.view(layer.weight.shape))
        if layer.bias is not None:
            layer.bias.zero_()

    fused = _fused_projections(model)
    adjusted = []
    try:
        for layer in _forward_order(model, layers, fused, x):
            for _ in range(max_iterations):
                var = _output_variance(model, layer, fused, x)
                if var is None or var <= 0 or abs(var - 1.0) < tolerance:
                    break
                layer.weight.div_(var**0.5)
            adjusted.append(names[layer])
    finally:
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        model.train(was_training)
    return adjusted


def _forward_order(model: nn.Module, layers: list[nn.Module], fused: dict, x: torch.Tensor) -> list[nn.Module]:
    """The layers in the order a forward pass reaches them; layers it never reaches are left out."""
    order: list[nn.Module] = []
    handles = []
    for layer in layers:
        if layer in fused:
            attn, _ = fused[layer]
            handles.append(attn.register_forward_pre_hook(lambda _m, _a, layer=layer: order.append(layer)))
        else:
            handles.append(layer.register_forward_hook(lambda _m, _a, _o, layer=layer: order.append(layer)))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))
