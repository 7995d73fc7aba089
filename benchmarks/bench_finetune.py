"""Fine-tuning the bundled backbone on 10 pairs of structures it never saw: zero-shot, the defaults, the reference.

For each structure the backbone was never trained on (membranes and
mitochondria, see ``napari_cnnt.synthetic.BACKBONE_STRUCTURES``) and each
photon level (``--levels``, photons at the brightest pixel), a simulated
microscope (random gain, offset, read noise, PSF, background, bleaching,
drift and density, drawn once) records 10 noisy/clean training pairs of
16 x SIZE x SIZE and 3 held-out test stacks of 16 x 128 x 128 of other
scenes, from seeds used nowhere else: a user fine-tuning on a few pairs of
their own microscope. Each run fine-tunes with
``napari_cnnt.finetune(backbone, pairs)`` (the defaults: the few-sample
recipe) or with ``recipe="reference"``, in a fresh process so that its peak
memory (RSS) is its own, and scores the result on the test stacks (PSNR
against the truth's range, and SSIM, mean over the stacks).

CPU variants: ``fast`` (the bfloat16 fast path), ``f32`` (float32) and
``avx2`` (float32 with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``,
as on a CPU without AVX-512). Writes one CSV row per run and a plot of test
PSNR against wall time. Usage::

    python benchmarks/bench_finetune.py --variants fast f32 avx2 --sizes 96 --methods defaults reference \\
        [--csv benchmarks/finetune.csv] [--png benchmarks/finetune.png] [--append]
    python benchmarks/bench_finetune.py --measure-memory     # the memory rule of training/plan.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _runs import read_csv, report, run_child, write_csv

HERE = Path(__file__).resolve().parent
STRUCTURES = ("membranes", "mitochondria")
LEVELS = (300.0, 40.0, 8.0)
TEST_SHAPE = (16, 128, 128)
N_TRAIN, N_TEST = 10, 3
TRAIN_SEED, TEST_SEED = 910_000, 710_000
VARIANTS = {
    "fast": ({}, True),
    "f32": ({}, False),
    "avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, False),
}
COLUMNS = ("variant", "cpu", "size", "structure", "photons", "method", "recipe", "psnr_db", "gain_db", "ssim",
           "zero_shot_db", "wall_s", "peak_rss_gb", "steps", "epochs_run", "best_epoch", "outcome")


def microscope(structure: str, photons: float) -> dict:
    """The acquisition conditions of one simulated microscope, at a fixed photon level."""
    from napari_cnnt.synthetic import random_conditions

    rng = np.random.default_rng([STRUCTURES.index(structure), int(photons), 0xF1E7])
    return {**random_conditions(rng), "peak_photons": float(photons)}


def recording(seed: int, structure: str, shape, photons: float):
    from napari_cnnt.synthetic import simulate

    return simulate(shape, structures=(structure,), seed=seed, **microscope(structure, photons))


def _offset(structure: str, photons: float) -> int:
    return 1000 * (STRUCTURES.index(structure) * len(LEVELS) + LEVELS.index(photons))


def training_pairs(structure: str, photons: float, size: int) -> list:
    return [recording(TRAIN_SEED + _offset(structure, photons) + i, structure, (16, size, size), photons)
            for i in range(N_TRAIN)]


def test_stacks(structure: str, photons: float) -> list:
    return [recording(TEST_SEED + _offset(structure, photons) + k, structure, TEST_SHAPE, photons)
            for k in range(N_TEST)]


def cpu_name() -> str:
    try:
        flags = set(open("/proc/cpuinfo").read().split())
        isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        return f"{model} ({os.cpu_count()} cores; {' '.join(isa)})"
    except (OSError, StopIteration):
        return platform.processor()


def scores(model, stacks, fast: bool) -> tuple[list[float], list[float]]:
    from skimage.metrics import structural_similarity

    import napari_cnnt
    from napari_cnnt.cli import psnr_db
    from napari_cnnt.runtime import Runtime

    runtime = Runtime.create("cpu", fast)
    p, q = [], []
    for noisy, clean in stacks:
        out = napari_cnnt.denoise(noisy, model, device=runtime)
        p.append(psnr_db(out, clean))
        data_range = float(clean.max() - clean.min())
        q.append(float(structural_similarity(clean, out.astype(np.float32), data_range=data_range)))
    return p, q


def one_run(spec: dict) -> dict:
    """Run in a child process: fine-tune (or not) and score; returns the CSV row."""
    import torch

    import napari_cnnt  # noqa: F401  (before torch: the allocator setting the product uses)

    fast = spec["fast"]
    stacks = test_stacks(spec["structure"], spec["photons"])
    backbone = napari_cnnt.load_model()
    zero_p, _ = scores(backbone, stacks, fast)
    row = {"variant": spec["variant"], "cpu": cpu_name(), "size": spec["size"], "structure": spec["structure"],
           "photons": spec["photons"], "method": spec["method"], "recipe": "", "steps": 0, "epochs_run": 0,
           "best_epoch": "", "outcome": ""}
    t0 = time.perf_counter()
    if spec["method"] == "zero-shot":
        model = backbone
    else:
        pairs = training_pairs(spec["structure"], spec["photons"], spec["size"])
        recipe = "few-sample" if spec["method"] == "defaults" else "reference"
        steps = []
        model, history = napari_cnnt.finetune(backbone, pairs, recipe, device="cpu", fast=fast,
                                              progress=lambda p: steps.append(1) if p.event == "step" else None)
        row.update(recipe=recipe, steps=len(steps), epochs_run=len(history), best_epoch=history.best_epoch,
                   outcome=history.summary())
        row["val"] = [history.initial.get("val_psnr")] + history["val_psnr"]
        row["notes"] = history.notes
    wall = time.perf_counter() - t0
    p, q = scores(model, stacks, fast)
    row.update(psnr_db=round(float(np.mean(p)), 3), gain_db=round(float(np.mean(p) - np.mean(zero_p)), 3),
               ssim=round(float(np.mean(q)), 4), zero_shot_db=round(float(np.mean(zero_p)), 3), wall_s=round(wall, 1),
               peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
               threads=torch.get_num_threads())
    return row


def measure_memory() -> None:
    """Peak RSS growth of training steps per input voxel, for the rule in training/plan.py."""
    code = """
import resource, sys, torch
import napari_cnnt
from napari_cnnt.inference import _floats_per_voxel
from napari_cnnt.model import CNNTDenoiser, preset
from napari_cnnt.runtime import Runtime
name, fast, b, t, h = sys.argv[1], sys.argv[2] == "1", *map(int, sys.argv[3:6])
rt = Runtime.create("cpu", fast)
model = rt.prepare(CNNTDenoiser(preset(name)).train())
opt = torch.optim.AdamW(model.parameters())
x = torch.rand(b, t, 1, h, h)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
for _ in range(2):
    with rt.autocast():
        out = model(x)
    loss = (out.float() - x).square().mean()
    opt.zero_grad(); loss.backward(); opt.step()
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
floats = grown / 4 / (b * t * h * h)
print(f"{name:9s} fast={fast!s:5s} [{b}, {t}, {h}, {h}]: {grown / 2**30:.2f} GB, {floats:.0f} floats/voxel, "
      f"{floats / _floats_per_voxel(model.config):.2f} x inference's {_floats_per_voxel(model.config)}")
"""
    for name, shapes in (("small", ((4, 16, 64), (2, 16, 96))), ("reference", ((1, 16, 64),))):
        for fast in (False, True):
            for b, t, h in shapes:
                subprocess.run([sys.executable, "-c", code, name, str(int(fast)), str(b), str(t), str(h)], check=True)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(int(r["size"]), float(r["photons"])) for r in rows})
    fig, axes = plt.subplots(len(panels), len(STRUCTURES), figsize=(5 * len(STRUCTURES), 3.4 * len(panels)),
                             squeeze=False)
    markers = {"fast": "o", "f32": "s", "avx2": "^"}
    colours = {"zero-shot": "grey", "defaults": "tab:blue", "reference": "tab:orange"}
    for i, (size, photons) in enumerate(panels):
        for j, structure in enumerate(STRUCTURES):
            ax = axes[i][j]
            for r in rows:
                if (int(r["size"]), float(r["photons"])) != (size, photons) or r["structure"] != structure:
                    continue
                ax.scatter(float(r["wall_s"]) / 60, float(r["psnr_db"]), marker=markers.get(r["variant"], "x"),
                           color=colours.get(r["method"], "black"), s=50)
            ax.set_title(f"{structure}, {photons:g} photons, 10 pairs of 16 x {size} x {size}", fontsize=9)
            ax.set_xlabel("fine-tuning wall time (min)")
            ax.set_ylabel("test PSNR (dB, 3 stacks)")
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], linestyle="", marker="o", color=c, label=m) for m, c in colours.items()]
    handles += [plt.Line2D([], [], linestyle="", marker=mk, color="black", label=v) for v, mk in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["fast"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[96])
    ap.add_argument("--methods", nargs="+", choices=("zero-shot", "defaults", "reference"),
                    default=["zero-shot", "defaults", "reference"])
    ap.add_argument("--structures", nargs="+", choices=STRUCTURES, default=list(STRUCTURES))
    ap.add_argument("--levels", nargs="+", type=float, choices=LEVELS, default=[40.0, 8.0],
                    help="photon levels (default: 40 8)")
    ap.add_argument("--csv", type=Path, default=HERE / "finetune.csv")
    ap.add_argument("--png", type=Path, default=HERE / "finetune.png")
    ap.add_argument("--append", action="store_true", help="add to the CSV instead of replacing it")
    ap.add_argument("--measure-memory", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        report(one_run(json.loads(args.child)))
        return
    if args.measure_memory:
        measure_memory()
        return

    rows = []
    if args.append and args.csv.exists():
        rows = read_csv(args.csv)
    for variant in args.variants:
        env_extra, fast = VARIANTS[variant]
        for size, structure, photons, method in itertools.product(args.sizes, args.structures, args.levels,
                                                                  args.methods):
            if method == "zero-shot" and size != args.sizes[0]:
                continue  # the same model on the same test stacks
            spec = {"variant": variant, "fast": fast, "size": size, "structure": structure, "photons": photons,
                    "method": method}
            row = run_child(__file__, spec, env_extra)
            extra = {k: row.pop(k) for k in ("val", "notes", "threads") if k in row}
            rows.append(row)
            print(f"{variant:5s} {size:4d} {structure:13s} {photons:4g} {method:10s} PSNR {row['psnr_db']:6.2f} dB "
                  f"({row['gain_db']:+.2f}) SSIM {row['ssim']:.4f}  {row['wall_s']:6.1f} s  "
                  f"{row['peak_rss_gb']:.2f} GB  {row['outcome']}  {extra}", flush=True)
            # after every run, so that an interrupted benchmark keeps what it measured
            write_csv(rows, args.csv, COLUMNS)
    print(f"wrote {args.csv}")
    try:
        plot(rows, args.png)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'napari-cnnt[bench]')")


if __name__ == "__main__":
    main()
