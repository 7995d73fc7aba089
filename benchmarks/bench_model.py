"""Model size, compute and forward throughput of the presets: float32 versus the fast path.

Both variants run interleaved in the same process on the same input, so the
printed ratios hold even on a noisy machine. The accuracy section trains the
``small`` preset briefly on simulated data (or uses the bundled model when
present) and compares the PSNR against the ground truth of both variants on a
held-out stack. Usage::

    python benchmarks/bench_model.py [--frames 8] [--size 128] [--repeats 2] [--train-steps 80]
"""

from __future__ import annotations

import argparse
import os
import re
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

# napari_cnnt before torch: it sets up the allocator as the product runs.
from napari_cnnt.model import CNNTDenoiser, preset
from napari_cnnt.runtime import Runtime, fast_path_supported


def isa_line() -> str:
    """The CPU's instruction sets that matter here, and what oneDNN and ATen were allowed to use."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx512f|avx2)\b", f.read())))
    except OSError:
        flags = ["unknown"]
    limits = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "NAPARI_CNNT_DISABLE_BF16")
              if k in os.environ}
    mode = "AVX2 mode" if limits.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2" else "native"
    return (f"CPU flags: {' '.join(flags)}; {mode} (ATen {torch.backends.cpu.get_cpu_capability()}"
            f"{', ' + ', '.join(f'{k}={v}' for k, v in limits.items()) if limits else ''})")


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
            times[label] = min(times[label], timed(lambda rt=rt, label=label: rt.predict(models[label], x), 1))
    outputs = {label: variants[label].predict(models[label], x) for label in variants}
    diff = (outputs["float32"] - outputs["fast"]).abs().max().item()
    return dict(name=name, params=params, flops_per_pf=flops / pixel_frames, pixel_frames=pixel_frames,
                times=times, max_abs_diff=diff, flops=flops)


def _normalised_pair(seed: int, shape, peak_photons: float):
    from napari_cnnt.synthetic import simulate

    noisy, clean = simulate(shape, peak_photons=peak_photons, seed=seed)
    lo, hi = np.percentile(noisy, [1.5, 99.5])
    scale = lambda a: torch.from_numpy(((a - lo) / (hi - lo)).astype(np.float32))  # noqa: E731
    return scale(noisy), scale(clean)


def briefly_trained_small(steps: int) -> torch.nn.Module:
    """The small preset after ``steps`` AdamW steps on simulated pairs (ssim + 0.1 mse)."""
    from napari_cnnt.losses import CombinedLoss

    torch.manual_seed(0)
    model = CNNTDenoiser(preset("small")).train()
    pairs = [_normalised_pair(seed, (16, 96, 96), photons) for seed, photons in
             zip(range(100, 106), (10, 20, 40, 80, 160, 320))]
    loss_fn = CombinedLoss(["ssim", "mse"], [1.0, 0.1])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = []
        for _ in range(2):
            n, c = pairs[rng.integers(len(pairs))]
            t, y, x = rng.integers(0, 16 - 8 + 1), rng.integers(0, 96 - 64 + 1), rng.integers(0, 96 - 64 + 1)
            batch.append((n[t:t + 8, y:y + 64, x:x + 64], c[t:t + 8, y:y + 64, x:x + 64]))
        noisy = torch.stack([b[0] for b in batch])[:, :, None]
        clean = torch.stack([b[1] for b in batch])[:, :, None]
        opt.zero_grad()
        loss = loss_fn(model(noisy), clean)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def accuracy(train_steps: int) -> None:
    from napari_cnnt.metrics import psnr_db
    from napari_cnnt.model.checkpoint import BUNDLED_WEIGHTS, load_model

    if BUNDLED_WEIGHTS.is_file():
        model, source = load_model(), "bundled model"
    else:
        t0 = time.perf_counter()
        model = briefly_trained_small(train_steps)
        source = f"small preset trained {train_steps} steps ({time.perf_counter() - t0:.0f} s)"
    print(f"\naccuracy on held-out simulated stacks [16, 128, 128], {source}")
    print(f"{'photons':>8} {'noisy dB':>9} {'float32 dB':>11} {'fast dB':>8} {'fast - float32':>15}")
    worst = 0.0
    for photons in (10, 40, 160):
        noisy, clean = _normalised_pair(7, (16, 128, 128), photons)
        x = noisy[None, :, None]
        out = {}
        for label, fast in (("float32", False), ("fast", True)):
            rt = Runtime.create("cpu", fast=fast)
            m = CNNTDenoiser(model.config).eval()
            m.load_state_dict(model.state_dict())
            out[label] = psnr_db(rt.predict(rt.prepare(m), x)[0, :, 0], clean)
        d = out["fast"] - out["float32"]
        worst = max(worst, abs(d))
        print(f"{photons:>8} {psnr_db(noisy, clean):>9.2f} {out['float32']:>11.3f} {out['fast']:>8.3f} {d:>+15.4f}")
    verdict = "within" if worst < 0.05 else "OUTSIDE"
    print(f"largest |PSNR difference| {worst:.4f} dB: {verdict} the 0.05 dB budget for the fast path")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=80, help="training steps for the accuracy check")
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
    accuracy(args.train_steps)


if __name__ == "__main__":
    main()
