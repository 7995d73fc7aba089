"""Training throughput of the presets, float32 versus the bf16 fast path, and the fast path's accuracy.

Throughput: the training engine itself (patch sampling, forward, float32
loss, backward, clipping, AdamW) runs a few steps per variant, the variants
interleaved over several rounds so that both see the same machine; the best
round counts. Accuracy: a ``small`` backbone trained briefly on simulated
filaments and nuclei is fine-tuned to puncta with the same seed in float32
and with the fast path, and the final validation PSNRs are compared, next to
the spread between two float32 seeds. Usage::

    python benchmarks/bench_train.py [--frames 8] [--size 48] [--batch 2] [--steps 3] [--rounds 2]
                                     [--epochs 10] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

import napari_cnnt
from napari_cnnt.model import CNNTDenoiser, preset
from napari_cnnt.normalization import Normalization
from napari_cnnt.runtime import Runtime, fast_path_supported
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
        val_patches_per_sample=1, device=args.device, fast=fast, callback=on_step, stop=done,
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
    """Fine-tuning, the fast path's main use: the same backbone tuned to puncta in float32 and bf16."""
    def stacks(structures, seeds):
        return [simulate((args.frames, 64, 64), structures, seed=s) for s in seeds]

    common = dict(patch_sizes=(32, 48), time=args.frames, batch_size=4, patches_per_sample=4, device=args.device)
    t0 = time.perf_counter()
    backbone, h = napari_cnnt.train(
        stacks(("filaments", "nucleus"), range(4)), val_data=stacks(("filaments", "nucleus"), [40]),
        config="small", normalization=NORM, epochs=args.epochs, lr=1e-3, fast=False, seed=0, **common,
    )
    print(f"\nbackbone: small preset, {args.epochs} epochs on filaments + nucleus in float32 "
          f"({time.perf_counter() - t0:.0f} s), validation PSNR {h.best['val_psnr']:.2f} dB")
    train, val = stacks(("puncta",), range(10, 13)), stacks(("puncta",), [50, 51])
    runs = {"float32": (False, 0), "fast": (True, 0), "float32, seed 1": (False, 1)}
    final = {}
    for label, (fast, seed) in runs.items():
        t0 = time.perf_counter()
        _, h = napari_cnnt.finetune(backbone, train, val_pairs=val, epochs=args.epochs, lr=1e-4, fast=fast,
                                    seed=seed, **common)
        final[label] = h["val_psnr"][-1]
        print(f"fine-tuned on puncta, {label:<16} validation PSNR {h.initial['val_psnr']:.2f} -> "
              f"{final[label]:.3f} dB ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"fast - float32, same seed:      {final['fast'] - final['float32']:+.3f} dB")
    print(f"float32 seed 1 - seed 0 spread: {final['float32, seed 1'] - final['float32']:+.3f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each accuracy run")
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
