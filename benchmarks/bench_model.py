"""Model size, compute and forward throughput of the presets: float32 versus the fast path.

Both variants run interleaved in the same process on the same input, so the
printed ratios hold even on a noisy machine. Usage::

    python benchmarks/bench_model.py [--frames 8] [--size 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_cnnt.model import CNNTDenoiser, preset
from napari_cnnt.runtime import Runtime, fast_path_supported


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` wall times (the least disturbed run)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_preset(name: str, frames: int, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    config = preset(name)
    x = torch.rand(1, frames, 1, size, size)
    base = CNNTDenoiser(config).eval()
    params = sum(p.numel() for p in base.parameters())
    flops = count_flops(base, x)
    pixel_frames = frames * size * size

    variants = {"float32": Runtime.create("cpu", fast=False), "fast": Runtime.create("cpu", fast=True)}
    models = {}
    for label, rt in variants.items():
        m = CNNTDenoiser(config).eval()
        m.load_state_dict(base.state_dict())
        models[label] = rt.prepare(m)
        rt.predict(models[label], x)  # warm-up: oneDNN primitive creation
    times = {label: float("inf") for label in variants}
    for _ in range(repeats):  # interleaved so both see the same machine state
        for label, rt in variants.items():
            times[label] = min(times[label], timed(lambda: rt.predict(models[label], x), 1))
    outputs = {label: variants[label].predict(models[label], x) for label in variants}
    diff = (outputs["float32"] - outputs["fast"]).abs().max().item()
    return dict(name=name, params=params, flops_per_pf=flops / pixel_frames, pixel_frames=pixel_frames,
                times=times, max_abs_diff=diff, flops=flops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU bf16 fast path supported: {fast_path_supported(torch.device('cpu'))}")
    print(f"input [1, {args.frames}, 1, {args.size}, {args.size}], best of {args.repeats} interleaved runs\n")
    header = (f"{'preset':<10} {'params':>10} {'MFLOP/pf':>9} {'variant':<8} {'seconds':>8} "
              f"{'Mpf/s':>8} {'GFLOP/s':>8} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    for name in ("small", "reference"):
        r = bench_preset(name, args.frames, args.size, args.repeats)
        for label in ("float32", "fast"):
            t = r["times"][label]
            ratio = r["times"]["float32"] / t
            print(f"{name:<10} {r['params']:>10,} {r['flops_per_pf'] / 1e6:>9.3f} {label:<8} {t:>8.3f} "
                  f"{r['pixel_frames'] / t / 1e6:>8.4f} {r['flops'] / t / 1e9:>8.1f} {ratio:>7.2f}x")
        print(f"{'':<10} fast vs float32 max |diff| on random weights: {r['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
