"""Training throughput of the presets, float32 versus the bf16 fast path, and the fast path's accuracy.

Throughput: the training engine itself (patch sampling, forward, float32
loss, backward, clipping, AdamW) runs a few steps per variant, the variants
interleaved over several rounds so that both see the same machine; the best
round counts. Accuracy: a ``small`` backbone trained briefly on simulated
filaments and nuclei is fine-tuned to puncta with the reference's recipe,
with the same seed in float32 and with the fast path, and the final
validation PSNRs are compared. Usage::

    python benchmarks/bench_train.py [--frames 8] [--size 48] [--batch 2] [--steps 3] [--rounds 2]
                                     [--epochs 30] [--seeds 0 1] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

import napari_cnnt  # before torch: it sets up the allocator as the product runs
from napari_cnnt.model import CNNTDenoiser, preset
from napari_cnnt.normalization import Normalization
from napari_cnnt.runtime import fast_path_supported
from napari_cnnt.synthetic import simulate

# The simulator's camera: offset 100 ADU, brightest pixels near 170 ADU.
NORM = Normalization("fixed", 100, 180)


def steps_per_second(model, pairs, args, fast: bool) -> float:
    """Steps per second over one epoch of ``args.steps`` steps, the first (warm-up) step excluded."""
    stamps = []
    done = threading.Event()

    def on_step(p):
        stamps.append(time.perf_counter())
        if len(stamps) > args.steps:
            done.set()

    napari_cnnt.finetune(
        model, pairs, val_pairs=pairs[:1], epochs=1, lr=1e-4, patch_sizes=(args.size,), time=args.frames,
        batch_size=args.batch, patches_per_sample=(args.steps + 1) * args.batch // len(pairs) + 1,
        val_patches_per_sample=1, device=args.device, fast=fast, progress=on_step, stop=done,
    )
    return args.steps / (stamps[args.steps] - stamps[0])


def throughput(args) -> None:
    pairs = [simulate((args.frames, 2 * args.size, 2 * args.size), seed=s) for s in range(2)]
    print(f"training steps/s, batch {args.batch} x {args.frames} x {args.size} x {args.size}, "
          f"device {args.device}, {torch.get_num_threads()} threads, "
          f"native bf16: {fast_path_supported(torch.device(args.device))}")
    print(f"{'preset':<10} {'params':>10} {'float32':>10} {'fast':>10} {'fast/f32':>9}")
    for name in ("small", "reference"):
        torch.manual_seed(0)
        model = CNNTDenoiser(preset(name))
        model.normalization = NORM
        best = {False: 0.0, True: 0.0}
        for _ in range(args.rounds):
            for fast in (False, True):
                best[fast] = max(best[fast], steps_per_second(model, pairs, args, fast))
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<10} {params / 1e6:>9.2f}M {best[False]:>10.3f} {best[True]:>10.3f} "
              f"{best[True] / best[False]:>8.2f}x", flush=True)


def accuracy(args) -> None:
    """The reference's fine-tuning recipe, the fast path's main use, in float32 and in bf16.

    A ``small`` backbone is trained briefly in float32 on filaments and nuclei
    (one-cycle schedule, no LSUV, so that it is usable after a minute), then
    fine-tuned to puncta with the recipe (lr 2.5e-5, ssim + 0.1 mse,
    ReduceLROnPlateau) with the same seeds in both precisions.
    """
    frames = 4

    def stacks(structures, seeds):
        return [simulate((frames, 64, 64), structures, seed=s) for s in seeds]

    common = dict(patch_sizes=(32,), time=frames, batch_size=4, patches_per_sample=6, val_patches_per_sample=4,
                  device=args.device)
    t0 = time.perf_counter()
    backbone, h = napari_cnnt.train(
        stacks(("filaments", "nucleus"), range(4)), val_data=stacks(("filaments", "nucleus"), [40, 41]),
        config="small", normalization=NORM, epochs=20, lr=1e-3, scheduler="OneCycleLR", lsuv=False,
        fast=False, seed=0, **common,
    )
    print(f"\nbackbone: small preset, 20 epochs on filaments + nuclei in float32 ({time.perf_counter() - t0:.0f} s), "
          f"validation PSNR {h['val_psnr'][-1]:.2f} dB")
    train, val = stacks(("puncta",), range(10, 13)), stacks(("puncta",), [50, 51])
    print(f"fine-tuning to puncta, {args.epochs} epochs of the reference recipe; final validation PSNR:")
    print(f"{'seed':>4} {'before':>9} {'float32':>16} {'fast':>16} {'fast - float32':>15}")
    for seed in args.seeds:
        final = {}
        for fast in (False, True):
            t0 = time.perf_counter()
            _, h = napari_cnnt.finetune(backbone, train, val_pairs=val, epochs=args.epochs, fast=fast, seed=seed,
                                        **common)
            final[fast] = (h["val_psnr"][-1], time.perf_counter() - t0, h.initial["val_psnr"])
        (p32, t32, start), (p16, t16, _) = final[False], final[True]
        print(f"{seed:>4} {start:>6.2f} dB {p32:>9.3f} dB {t32:>3.0f}s {p16:>9.3f} dB {t16:>3.0f}s "
              f"{p16 - p32:>+12.3f} dB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs of the accuracy runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the accuracy runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is steadier on a busy machine)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_accuracy:
        accuracy(args)


if __name__ == "__main__":
    main()
