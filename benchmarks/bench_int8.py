"""Int8 convolutions on this CPU: what they would gain in time, and cost in PSNR, for the bundled model.

Convolutions are most of CNNT's work, so they bound what int8 can give:

- speed: every convolution of the bundled model, at the input shapes one batch of ``denoise``'s
  tiles gives it, in float32 (as the plain model runs it) against PyTorch's quantized convolution
  (``torch.ao.nn.quantized.Conv2d``, the fbgemm engine: AVX2, or VNNI where the CPU has it),
  including the quantizing of its input and the dequantizing of its output;
- accuracy: the sample data denoised with every convolution's weights rounded to int8 per output
  channel and its input to uint8 per tensor (scale from that very input: kinder than the fixed,
  calibrated scale a deployed static model would use), against float32; then with only the
  weights, and only the inputs, rounded, to show where the loss comes from.

Usage::

    python benchmarks/bench_int8.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch

import napari_cnnt  # before torch's first use: it sets up the allocator
from napari_cnnt import runtime
from napari_cnnt.inference import auto_batch_size, auto_layout
from napari_cnnt.metrics import psnr_db
from napari_cnnt.runtime import Runtime
from napari_cnnt.synthetic import sample_recording


def cpu_name() -> str:
    flags = set(open("/proc/cpuinfo").read().split())
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2") if f in flags]
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mode = "AVX2 mode" if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2" else "native"
    return f"{model} ({os.cpu_count()} cores; {' '.join(isa)}); {mode}"


def conv_inputs(model, x: torch.Tensor) -> list[tuple[torch.nn.Conv2d, torch.Tensor]]:
    """Every Conv2d of ``model`` with the input it gets when ``model`` runs on ``x``."""
    seen, hooks = [], []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach().clone()))))
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def quantized(conv: torch.nn.Conv2d, x: torch.Tensor):
    """``conv`` as an fbgemm int8 convolution, its input scale taken from ``x``, and that scale."""
    from torch.ao.nn.quantized import Conv2d as QConv2d

    w = conv.weight.detach()
    scales = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-8) / 127
    qw = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
    q = QConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    q.set_weight_bias(qw, None if conv.bias is None else conv.bias.detach())
    with torch.inference_mode():
        out = conv(x)
    lo, hi = min(float(out.min()), 0.0), max(float(out.max()), 0.0)
    q.scale, q.zero_point = max(hi - lo, 1e-8) / 255, int(round(-lo / max(hi - lo, 1e-8) * 255))
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = max(hi - lo, 1e-8) / 255
    return q, scale, int(round(-lo / scale))


def run_int8(q, x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    return q(torch.quantize_per_tensor(x, scale, zero, torch.quint8)).dequantize()


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def int8_rounded_conv2d(conv2d, weights: bool = True, inputs: bool = True):
    """``conv2d`` with its weight rounded to int8 per output channel and/or its input to uint8
    per tensor first."""

    def rounded(x, weight, bias=None, *args, **kwargs):
        if inputs:
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            scale = max(hi - lo, 1e-8) / 255
            x = torch.fake_quantize_per_tensor_affine(x, scale, int(round(-lo / scale)), 0, 255)
        if weights:
            scales = weight.abs().amax(dim=(1, 2, 3)).clamp_min(1e-8) / 127
            weight = torch.fake_quantize_per_channel_affine(
                weight, scales, torch.zeros_like(scales, dtype=torch.int32), 0, -128, 127)
        return conv2d(x, weight, bias, *args, **kwargs)

    return rounded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.backends.quantized.engine = "fbgemm"
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}")
    model = napari_cnnt.load_model().eval()
    rt = Runtime.create("cpu", fast=False)
    tile, _ = auto_layout(model.config, (32, 256, 256), rt)
    x = torch.rand(auto_batch_size(model.config, tile, rt), tile[0], 1, tile[1], tile[2])

    f32 = i8 = 0.0
    with torch.inference_mode():
        for conv, inp in conv_inputs(model, x):
            q, scale, zero = quantized(conv, inp)
            f32 += best_of(functools.partial(conv, inp), args.repeats)
            i8 += best_of(functools.partial(run_int8, q, inp, scale, zero), args.repeats)
    print(f"convolutions of one batch {list(x.shape)}: float32 {f32:.3f} s, int8 {i8:.3f} s "
          f"(int8 {f32 / i8:.2f}x float32)")

    noisy, clean = sample_recording()
    plain = napari_cnnt.denoise(noisy, model, device=rt)
    a = psnr_db(plain, clean)
    from unittest import mock

    # Every convolution through F.conv2d (no fused oneDNN mixer), rounded.
    for label, weights, inputs in (("int8 convolutions", True, True), ("weights only", True, False),
                                   ("inputs only", False, True)):
        with mock.patch.object(runtime, "float32_fusion_pays", lambda config: False), \
                mock.patch.object(torch.nn.functional, "conv2d",
                                  int8_rounded_conv2d(torch.nn.functional.conv2d, weights, inputs)):
            approx = napari_cnnt.denoise(noisy, model, device=Runtime.create("cpu", fast=False))
        b = psnr_db(approx, clean)
        print(f"sample {noisy.shape}: float32 {a:.3f} dB, {label} rounded {b:.3f} dB ({b - a:+.3f} dB)")


if __name__ == "__main__":
    main()
