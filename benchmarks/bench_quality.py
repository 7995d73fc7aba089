"""Denoising quality of the bundled backbone against what else a user has.

Held-out simulated recordings (seeds never used in training) at three photon
levels, in two groups: structures the backbone was trained on (nuclei,
filaments, puncta) and one it never saw (membranes). For each recording the
table reports PSNR and SSIM against the noise-free truth (mean over
recordings) of:

- the noisy input;
- a 3-D Gaussian filter and 2-D non-local means (scikit-image), each tuned per
  group and photon level on separate recordings (grid search for the best PSNR);
- the bundled backbone alone;
- the backbone fine-tuned on 10 membrane recordings (8 train, 2 validate);
- the ``small`` preset trained from scratch on the same 10 recordings, with
  the same number of steps, patches and loss.

Usage::

    python benchmarks/bench_quality.py [--stacks 4] [--epochs 20] [--csv benchmarks/quality.csv]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity
from skimage.restoration import denoise_nl_means

import napari_cnnt
from napari_cnnt.metrics import psnr_db
from napari_cnnt.synthetic import random_conditions, simulate

SHAPE = (16, 128, 128)
LEVELS = {"high photons (300)": 300.0, "medium (40)": 40.0, "low photons (8)": 8.0}
GROUPS = {"trained structures": ("nucleus", "filaments", "puncta"), "held-out membranes": ("membranes",)}
TEST_SEED, TUNE_SEED, FINETUNE_SEED = 700_000, 800_000, 900_000
GAUSS_SIGMAS = [(st, s) for st in (0.0, 0.5, 1.0, 2.0) for s in (0.5, 0.75, 1.0, 1.5, 2.0)]
NLM_H = (0.4, 0.6, 0.8, 1.0, 1.3)


def recording(seed: int, structures, peak_photons: float | None = None):
    """One recording with random conditions; ``peak_photons`` fixes the photon level."""
    rng = np.random.default_rng([seed, 0xBE4C])
    settings = random_conditions(rng)
    if peak_photons is not None:
        settings["peak_photons"] = peak_photons
    chosen = [s for s in structures if rng.uniform() < 0.5] or [structures[rng.integers(len(structures))]]
    return simulate(SHAPE, structures=chosen, seed=seed, **settings)


def scores(result: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    data_range = float(clean.max() - clean.min())
    ssim = structural_similarity(clean, result.astype(np.float32), data_range=data_range)
    return psnr_db(result, clean), float(ssim)


def gaussian(noisy: np.ndarray, sigmas) -> np.ndarray:
    st, s = sigmas
    return ndimage.gaussian_filter(noisy.astype(np.float32), (st, s, s))


def noise_sigma(frame: np.ndarray) -> float:
    """Immerkaer's fast estimate of the noise standard deviation of one frame."""
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    residual = np.abs(ndimage.convolve(frame, kernel))[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * residual.mean() / 6)


def nlm(noisy: np.ndarray, h: float) -> np.ndarray:
    x = noisy.astype(np.float32)
    out = np.empty_like(x)
    for t, frame in enumerate(x):
        sigma = noise_sigma(frame)
        out[t] = denoise_nl_means(frame, h=h * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True)
    return out


def tuned(method, grid, tuning) -> object:
    """The grid value with the best mean PSNR on the tuning recordings."""
    return max(grid, key=lambda p: np.mean([psnr_db(method(n, p), c) for n, c in tuning]))


def training_pairs(count: int) -> list:
    """Membrane recordings over the whole range of conditions, for fine-tuning."""
    return [recording(FINETUNE_SEED + i, GROUPS["held-out membranes"])[:2] for i in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stacks", type=int, default=4, help="test recordings per group and photon level")
    ap.add_argument("--tune-stacks", type=int, default=2, help="tuning recordings per group and level")
    ap.add_argument("--epochs", type=int, default=20, help="fine-tuning / from-scratch epochs (8 steps each)")
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--scratch-lr", type=float, default=1e-3)
    ap.add_argument("--model", help="backbone file (default: the bundled model)")
    ap.add_argument("--csv", type=Path, default=Path(__file__).with_name("quality.csv"))
    args = ap.parse_args()

    backbone = napari_cnnt.load_model(args.model)
    meta = backbone.metadata.get("training", {})
    loss, loss_weights = meta.get("loss", ["ssim", "mse"]), meta.get("loss_weights", [1.0, 1.0])
    budget = dict(epochs=args.epochs, patch_sizes=(64,), time=16, batch_size=4, patches_per_sample=4,
                  loss=loss, loss_weights=loss_weights, seed=0)
    pairs = training_pairs(10)
    print(f"budget for both: 10 membrane recordings {SHAPE} (8 train, 2 validate), {args.epochs} epochs x 8 steps "
          f"of 4 patches 16x64x64, loss {'+'.join(loss)} {loss_weights}; lr {args.finetune_lr} (fine-tune), "
          f"{args.scratch_lr} (scratch, LSUV init)")
    t0 = time.perf_counter()
    finetuned, h1 = napari_cnnt.finetune(backbone, pairs[:8], val_pairs=pairs[8:], lr=args.finetune_lr, **budget)
    t1 = time.perf_counter()
    scratch, h2 = napari_cnnt.train(pairs[:8], val_data=pairs[8:], config="small",
                                   normalization=backbone.normalization, lr=args.scratch_lr, **budget)
    t2 = time.perf_counter()
    print(f"fine-tuning {t1 - t0:.0f} s, from scratch {t2 - t1:.0f} s")

    models = {"backbone": backbone, "fine-tuned (10)": finetuned, "from scratch (10)": scratch}
    rows = []
    for (group, structures), (level, photons) in itertools.product(GROUPS.items(), LEVELS.items()):
        cell = f"{group:<20} {level:<20}"
        key = cell_offset(group, level)
        tuning = [recording(TUNE_SEED + key + i, structures, photons)[:2] for i in range(args.tune_stacks)]
        sig = tuned(gaussian, GAUSS_SIGMAS, tuning)
        h = tuned(nlm, NLM_H, tuning)
        methods = {
            "noisy": lambda n: n.astype(np.float32),
            f"gaussian {sig}": lambda n, sig=sig: gaussian(n, sig),
            f"nl-means h={h}sigma": lambda n, h=h: nlm(n, h),
            **{name: (lambda n, m=m: napari_cnnt.denoise(n, m)) for name, m in models.items()},
        }
        results = {name: [] for name in methods}
        for i in range(args.stacks):
            noisy, clean = recording(TEST_SEED + key + i, structures, photons)
            for name, method in methods.items():
                results[name].append(scores(method(noisy), clean))
        for name, values in results.items():
            psnr, ssim = np.mean(values, axis=0)
            rows.append({"group": group, "level": level, "method": name, "psnr_db": round(float(psnr), 2),
                         "ssim": round(float(ssim), 4)})
            print(f"{cell} {name:<24} PSNR {psnr:6.2f} dB  SSIM {ssim:.4f}", flush=True)

    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")
    summarize(rows)


def cell_offset(group: str, level: str) -> int:
    """A distinct seed block per table cell."""
    return 1000 * (list(GROUPS).index(group) * len(LEVELS) + list(LEVELS).index(level))


def summarize(rows: list[dict]) -> None:
    """The issue's goals, read off the table."""
    def psnr(group, level, method_prefix):
        return max(r["psnr_db"] for r in rows
                   if r["group"] == group and r["level"] == level and r["method"].startswith(method_prefix))

    print("\ngoals (PSNR differences in dB):")
    for group, level in itertools.product(GROUPS, LEVELS):
        classical = max(psnr(group, level, "gaussian"), psnr(group, level, "nl-means"))
        ft, sc, bb = (psnr(group, level, m) for m in ("fine-tuned", "from scratch", "backbone"))
        print(f"  {group:<20} {level:<20} fine-tuned - scratch {ft - sc:+6.2f}   fine-tuned - best classical "
              f"{ft - classical:+6.2f}   backbone - best classical {bb - classical:+6.2f}")


if __name__ == "__main__":
    main()
