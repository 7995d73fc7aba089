"""How tile size and overlap change the result: PSNR, seams and redundant compute.

The sample data (32 x 256 x 256) is denoised with the bundled model in float32
with several tile layouts. For each it prints the number of tiles, the
redundancy (voxel-frames the network computes per output voxel-frame), the
PSNR against the truth and a seam measure per axis: the mean squared step
between neighbouring frames, rows or columns across the tiles' edges,
divided by the same inside the tiles, for the result and for the truth at the
same places. A seam shows as a result ratio well above the truth's.

With ``--png`` it also writes a crop of the default layout's result across a
tile corner, with the noisy input and the truth beside it and the tile edges
marked (``docs/images/seam_crop.png``). Usage::

    python benchmarks/bench_seams.py [--png docs/images/seam_crop.png]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import napari_cnnt
from napari_cnnt.inference import TilePlan, auto_layout
from napari_cnnt.metrics import psnr_db
from napari_cnnt.runtime import Runtime
from napari_cnnt.synthetic import sample_recording

LAYOUTS = {  # label: (tile, overlap); None: the automatic layout
    "training patch, 1/4 overlap (before)": ((16, 64, 64), (4, 16, 16)),
    "default": None,
    "no time overlap": ((16, 64, 64), (0, 16, 16)),
    "no spatial overlap": ((18, 64, 64), (4, 0, 0)),
    "whole window of 32 frames": ((32, 64, 64), (0, 16, 16)),
    "128 x 128 tiles": ((18, 128, 128), (4, 32, 32)),
    "whole frames": ((18, 256, 256), (4, 0, 0)),
}


def edges(plan: TilePlan, axis: int) -> list[int]:
    """Positions ``i`` inside the stack where a tile begins or ends between ``i - 1`` and ``i``."""
    a = plan.axes[axis]
    found = set()
    for s in a.starts:
        for e in (s - a.pad_before, s - a.pad_before + a.tile):
            if 0 < e < a.size:
                found.add(e)
    return sorted(found)


def seam_ratio(stack: np.ndarray, plan: TilePlan, axis: int) -> float | None:
    """Mean squared step across tile edges along ``axis`` over the mean squared step elsewhere."""
    where = edges(plan, axis)
    if not where:
        return None
    step = np.diff(stack.astype(np.float64), axis=axis) ** 2
    energy = step.mean(axis=tuple(i for i in range(3) if i != axis))
    at = np.zeros(len(energy), bool)
    at[np.array(where) - 1] = True
    return float(energy[at].mean() / energy[~at].mean())


def save_crop(path: str, noisy: np.ndarray, result: np.ndarray, clean: np.ndarray, plan: TilePlan) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_edges, h_edges, w_edges = (edges(plan, a) for a in range(3))
    frame = t_edges[0] if t_edges else 0  # the first frame of a later time window
    y0, x0 = (h_edges[len(h_edges) // 2] - 40, w_edges[len(w_edges) // 2] - 40)
    crop = np.s_[frame, y0:y0 + 80, x0:x0 + 80]
    lo, hi = np.percentile(clean[crop], (0.5, 99.5))
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3), dpi=110)
    for ax, (title, image) in zip(axes, (("noisy", noisy), ("denoised (default tiles)", result), ("truth", clean))):
        ax.imshow(image[crop], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for e in h_edges:
        if y0 < e < y0 + 80:
            axes[1].axhline(e - y0 - 0.5, color="tab:orange", lw=0.6, ls=":")
    for e in w_edges:
        if x0 < e < x0 + 80:
            axes[1].axvline(e - x0 - 0.5, color="tab:orange", lw=0.6, ls=":")
    fig.suptitle(f"frame {frame} (first frame of a time window), rows {y0}-{y0 + 79}, columns {x0}-{x0 + 79}; "
                 "dotted: tile edges", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--png", help="write the crop across a seam here")
    args = ap.parse_args()
    model = napari_cnnt.load_model()
    noisy, clean = sample_recording()
    runtime = Runtime.create("cpu", fast=False)
    print(f"sample data {noisy.shape}, bundled model, float32; seam: result ratio (truth's ratio) per axis t, y, x")
    print(f"{'layout':<38}{'tile':>16}{'overlap':>13}{'tiles':>6}{'redund.':>8}{'PSNR dB':>9}{'time s':>8}  seams")
    for label, layout in LAYOUTS.items():
        tile, overlap = layout or auto_layout(model.config, noisy.shape, runtime)
        plan = TilePlan.create(noisy.shape, tile, overlap)
        start = time.perf_counter()
        result = napari_cnnt.denoise(noisy, model, tile=tile, overlap=overlap, device=runtime)
        seconds = time.perf_counter() - start
        seams = []
        for axis in range(3):
            r, c = seam_ratio(result, plan, axis), seam_ratio(clean, plan, axis)
            seams.append("-" if r is None else f"{r:.2f} ({c:.2f})")
        print(f"{label:<38}{str(tile):>16}{str(overlap):>13}{len(plan):>6}{plan.redundancy:>8.2f}"
              f"{psnr_db(result, clean):>9.3f}{seconds:>8.1f}  {', '.join(seams)}", flush=True)
        if layout is None and args.png:
            save_crop(args.png, noisy, result, clean, plan)


if __name__ == "__main__":
    main()
