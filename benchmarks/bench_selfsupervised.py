"""Self-supervised fine-tuning on the stacks to be denoised, against zero-shot, supervised fine-tuning
and a 2-D Noise2Void trained from scratch with the same time.

For each structure (``--structures``; by default membranes and mitochondria, which the bundled
backbone never saw, see ``napari_cnnt.synthetic.BACKBONE_STRUCTURES``) and photon level
(``--levels``, photons at the brightest pixel) a simulated microscope (random gain, offset, read
noise, PSF, background, bleaching, drift and density, drawn once per structure and level)
records 3 noisy stacks of 16 x 128 x 128: the recording a user wants denoised. Methods
(``--methods``), each in a fresh process so that its peak memory (RSS) is its own:

- ``zero-shot``: the bundled backbone as it is;
- ``self-supervised``: ``napari_cnnt.finetune(backbone, [noisy, noisy, noisy])``, the defaults
  (the self-supervised recipe), then denoising those stacks;
- ``supervised``: ``napari_cnnt.finetune(backbone, pairs)`` with 10 noisy/clean pairs of
  16 x 128 x 128 of other scenes of the same microscope (the few-sample recipe);
- ``n2v``: a 2-D Noise2Void trained from scratch on the frames of the 3 noisy stacks with N2V's
  published settings (U-net of depth 2 with 32 first-level features and batch norm, 64 x 64
  patches, 0.198 % of the pixels masked and replaced by a random neighbour other than
  themselves, Adam at 4e-4, mean and standard deviation normalisation), for as long as the
  self-supervised run of the same case took (``--n2v-seconds`` otherwise). CAREamics needs
  torchvision and lightning builds that pin another torch, so this trainer is written here.

Scores: PSNR (``napari_cnnt.metrics``: against the truth's range) and SSIM (skimage, the truth's
range) of the denoised stacks against their truth, mean over the 3 stacks; wall time of training
plus denoising; peak RSS. Writes a CSV and a PNG plot (``--csv``, ``--png``), and a picture of
one validation region before and after self-supervised fine-tuning (``--regions-png``).

No real fluorescence time-lapse ships offline with the installed packages (``skimage.data``'s
offline images are photographs and bright-field or retina images; ``cells3d`` needs a
download), so every case is simulated. Usage::

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 NAPARI_CNNT_DISABLE_BF16=1 \\
        python benchmarks/bench_selfsupervised.py [--levels 40 15 8] [--methods zero-shot self-supervised]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import zlib
from pathlib import Path

import numpy as np
from _runs import read_csv, report, run_child, write_csv

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STRUCTURES = ("membranes", "mitochondria")
LEVELS = (40.0, 15.0, 8.0)
METHODS = ("zero-shot", "self-supervised", "supervised", "n2v")
SHAPE = (16, 128, 128)
N_STACKS, N_PAIRS = 3, 10
STACK_SEED, PAIR_SEED = 520_000, 530_000
COLUMNS = ("cpu", "isa_mode", "structure", "photons", "method", "psnr_db", "gain_db", "ssim", "zero_shot_db",
           "train_s", "wall_s", "peak_rss_gb", "steps", "outcome")


def microscope(structure: str, photons: float) -> dict:
    """The acquisition conditions of one simulated microscope, at a fixed photon level."""
    from napari_cnnt.synthetic import random_conditions

    rng = np.random.default_rng([zlib.crc32(structure.encode()), int(photons), 0x55])
    return {**random_conditions(rng), "peak_photons": float(photons)}


def _seed(base: int, structure: str, photons: float) -> int:
    return base + 1000 * (zlib.crc32(structure.encode()) % 997) + int(photons)


def stacks(structure: str, photons: float) -> list:
    """The recording to denoise: ``N_STACKS`` (noisy, clean) stacks."""
    from napari_cnnt.synthetic import simulate

    return [simulate(SHAPE, structures=(structure,), seed=_seed(STACK_SEED, structure, photons) + k,
                     **microscope(structure, photons)) for k in range(N_STACKS)]


def pairs(structure: str, photons: float) -> list:
    """Training pairs of other scenes of the same microscope."""
    from napari_cnnt.synthetic import simulate

    return [simulate(SHAPE, structures=(structure,), seed=_seed(PAIR_SEED, structure, photons) + k,
                     **microscope(structure, photons)) for k in range(N_PAIRS)]


def cpu_name() -> str:
    flags = set(open("/proc/cpuinfo").read().split())
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{model} ({os.cpu_count()} cores; {' '.join(isa)})"


def isa_mode() -> str:
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2":
        return "avx2" + (", no bf16" if os.environ.get("NAPARI_CNNT_DISABLE_BF16") else "")
    return "native" + (", no bf16" if os.environ.get("NAPARI_CNNT_DISABLE_BF16") else "")


def score(outputs: list, data: list) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    from napari_cnnt.metrics import psnr_db, truth_range

    p = [psnr_db(out, clean) for out, (_, clean) in zip(outputs, data)]
    q = [float(structural_similarity(clean, out.astype(np.float32), data_range=truth_range(clean)))
         for out, (_, clean) in zip(outputs, data)]
    return float(np.mean(p)), float(np.mean(q))


# ----------------------------------------------------------------------------- Noise2Void, 2-D
def n2v_unet():
    """CSBDeep's U-net as N2V configures it: depth 2, 32 features doubling per level, 3 x 3
    convolutions, batch norm, ReLU, a linear 1 x 1 output, no residual."""
    import torch
    from torch import nn

    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self, f=32):
            super().__init__()
            self.d0, self.d1, self.mid = block(1, f), block(f, 2 * f), block(2 * f, 4 * f)
            self.u1, self.u0 = block(6 * f, 2 * f), block(3 * f, f)
            self.out = nn.Conv2d(f, 1, 1)

        def forward(self, x):
            a = self.d0(x)
            b = self.d1(nn.functional.max_pool2d(a, 2))
            c = self.mid(nn.functional.max_pool2d(b, 2))
            up = nn.functional.interpolate
            b = self.u1(torch.cat([b, up(c, scale_factor=2)], 1))
            return self.out(self.u0(torch.cat([a, up(b, scale_factor=2)], 1)))

    return UNet()


def n2v_mask(shape, rng, fraction=0.00198, radius=2):
    """N2V's stratified masking and uniform replacement: one pixel per box of 1/fraction pixels,
    its value taken from a random neighbour within ``radius`` other than itself."""
    b, h, w = shape
    g = max(1, round(1 / np.sqrt(fraction)))
    ys, xs, ns, sy, sx = [], [], [], [], []
    for n in range(b):
        by, bx = np.meshgrid(np.arange(0, h, g), np.arange(0, w, g), indexing="ij")
        y = (by + rng.integers(0, g, by.shape)).ravel()
        x = (bx + rng.integers(0, g, bx.shape)).ravel()
        keep = (y < h) & (x < w)
        y, x = y[keep], x[keep]
        while True:
            dy, dx = rng.integers(-radius, radius + 1, (2, len(y)))
            if not ((dy == 0) & (dx == 0)).any():
                break
            bad = (dy == 0) & (dx == 0)
            dy[bad] = 1  # a neighbour, never the pixel itself
        ys.append(y), xs.append(x), ns.append(np.full(len(y), n))
        sy.append(np.clip(y + dy, 0, h - 1)), sx.append(np.clip(x + dx, 0, w - 1))
    return tuple(np.concatenate(a) for a in (ns, ys, xs, sy, sx))


def train_n2v(noisy_stacks: list, seconds: float, seed: int = 0, batch: int = 128, patch: int = 64):
    """Train a 2-D N2V on every frame of the stacks for ``seconds``; returns (denoise function, steps)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    frames = np.concatenate([s.astype(np.float32) for s in noisy_stacks])
    mean, std = float(frames.mean()), float(frames.std())
    data = (frames - mean) / std
    net = n2v_unet()
    opt = torch.optim.Adam(net.parameters(), lr=4e-4)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=10)
    t0, steps = time.perf_counter(), 0
    net.train()
    while time.perf_counter() - t0 < seconds:
        f = rng.integers(0, len(data), batch)
        y0 = rng.integers(0, data.shape[1] - patch + 1, batch)
        x0 = rng.integers(0, data.shape[2] - patch + 1, batch)
        p = np.stack([data[i, a:a + patch, b:b + patch] for i, a, b in zip(f, y0, x0)])
        k = rng.integers(0, 4)
        p = np.rot90(p, k, axes=(1, 2))
        if rng.integers(0, 2):
            p = p[:, :, ::-1]
        p = np.ascontiguousarray(p)
        n, y, x, sy, sx = n2v_mask(p.shape, rng)
        inp = p.copy()
        inp[n, y, x] = p[n, sy, sx]
        out = net(torch.from_numpy(inp)[:, None])[:, 0]
        loss = (out[n, y, x] - torch.from_numpy(p[n, y, x])).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if steps % 20 == 0:
            sched.step(loss.item())
    net.eval()

    @torch.no_grad()
    def denoise(stack):
        x = torch.from_numpy((stack.astype(np.float32) - mean) / std)[:, None]
        return np.concatenate([net(x[i:i + 4]).numpy()[:, 0] for i in range(0, len(x), 4)]) * std + mean

    return denoise, steps


# ----------------------------------------------------------------------------- one run
def one_run(spec: dict) -> dict:
    """In a child process: train (or not), denoise the stacks and score them; returns the CSV row."""
    import napari_cnnt

    structure, photons, method = spec["structure"], spec["photons"], spec["method"]
    data = stacks(structure, photons)
    backbone = napari_cnnt.load_model()
    row = {"cpu": cpu_name(), "isa_mode": isa_mode(), "structure": structure, "photons": photons, "method": method,
           "steps": 0, "outcome": ""}
    t0 = time.perf_counter()
    extra = {}
    if method == "n2v":
        denoise, row["steps"] = train_n2v([n for n, _ in data], spec["seconds"])
        train_s = time.perf_counter() - t0
        outputs = [denoise(n) for n, _ in data]
    else:
        model = backbone
        if method != "zero-shot":
            counted = []
            training = [n for n, _ in data] if method == "self-supervised" else pairs(structure, photons)
            model, history = napari_cnnt.finetune(
                backbone, training, progress=lambda p: counted.append(1) if p.event == "step" else None)
            row.update(steps=len(counted), outcome=history.summary())
            extra = {"metric": history.metric, "initial": history.initial.get(history.metric),
                     "val": history[history.metric], "best_epoch": history.best_epoch, "notes": history.notes,
                     "split": history.split.to_dict() if history.split else None}
        train_s = time.perf_counter() - t0
        outputs = [napari_cnnt.denoise(n, model) for n, _ in data]
    wall = time.perf_counter() - t0
    p, q = score(outputs, data)
    row.update(psnr_db=round(p, 3), ssim=round(q, 4), train_s=round(train_s, 1), wall_s=round(wall, 1),
               peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    if spec.get("save_outputs"):
        np.save(spec["save_outputs"], np.stack(outputs).astype(np.float32))
    row["extra"] = extra
    return row


# ----------------------------------------------------------------------------- outputs
def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["structure"], float(r["photons"])) for r in rows))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    colours = {"zero-shot": "grey", "self-supervised": "tab:blue", "supervised": "tab:green", "n2v": "tab:orange"}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) + 2), 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, case in enumerate(cases):
            r = next((r for r in rows if (r["structure"], float(r["photons"])) == case and r["method"] == m), None)
            if r is not None:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(float(r["psnr_db"]))
        ax.bar(xs, ys, width, color=colours[m], label=m)
    lo = min(float(r["psnr_db"]) for r in rows)
    ax.set_ylim(lo - 3, max(float(r["psnr_db"]) for r in rows) + 1)
    ax.set_xticks(range(len(cases)), [f"{s}\n{p:g} photons" for s, p in cases], fontsize=8)
    ax.set_ylabel("PSNR of the 3 denoised stacks (dB)")
    ax.set_title("Denoising 3 noisy stacks of 16 x 128 x 128", fontsize=10)
    ax.legend(fontsize=8, ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def regions_picture(structure: str, photons: float, zero: np.ndarray, tuned: np.ndarray, path: Path) -> None:
    """The validation region of the first stack (its last quarter of columns): noisy, zero-shot,
    self-supervised, truth, one frame, on the truth's display range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noisy, clean = stacks(structure, photons)[0]
    cut = SHAPE[2] - SHAPE[2] // 4
    t = SHAPE[0] // 2
    lo, hi = np.percentile(clean, [0.5, 99.8])
    panels = [("noisy", noisy), ("zero-shot", zero[0]), ("self-supervised", tuned[0]), ("truth", clean)]
    fig, axes = plt.subplots(1, 4, figsize=(8, 4.4))
    for ax, (name, img) in zip(axes, panels):
        ax.imshow(img[t, :, cut:], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"validation region (held-out columns), {structure}, {photons:g} photons, frame {t}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    from napari_cnnt.synthetic import STRUCTURES as ALL

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--structures", nargs="+", choices=sorted(ALL), default=list(STRUCTURES))
    ap.add_argument("--levels", nargs="+", type=float, default=list(LEVELS), help="photon levels (default: 40 15 8)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--n2v-seconds", type=float, default=480.0,
                    help="N2V's training time when no self-supervised run of the case gives it (default: 480)")
    ap.add_argument("--csv", type=Path, default=RESULTS / "selfsupervised.csv")
    ap.add_argument("--png", type=Path, default=RESULTS / "selfsupervised.png")
    ap.add_argument("--regions-png", type=Path, default=RESULTS / "selfsupervised_region.png")
    ap.add_argument("--append", action="store_true", help="add to the CSV instead of replacing it")
    ap.add_argument("--plot-only", action="store_true", help="only draw the plot of the rows in --csv")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        report(one_run(json.loads(args.child)))
        return
    if args.plot_only:
        plot(read_csv(args.csv), args.png)
        return

    rows = []
    if args.append and args.csv.exists():
        rows = read_csv(args.csv)
    print(f"CPU: {cpu_name()}; mode: {isa_mode()}")
    tmp = RESULTS / ".outputs"
    tmp.mkdir(parents=True, exist_ok=True)
    pictured = False
    for structure in args.structures:
        for photons in args.levels:
            zero_db, ss_seconds, saved = None, None, {}
            for method in args.methods:
                spec = {"structure": structure, "photons": photons, "method": method,
                        "seconds": ss_seconds or args.n2v_seconds}
                if method in ("zero-shot", "self-supervised") and not pictured:
                    spec["save_outputs"] = str(tmp / f"{method}.npy")
                row = run_child(__file__, spec)
                extra = row.pop("extra", {})
                if method == "zero-shot":
                    zero_db = row["psnr_db"]
                if method == "self-supervised":
                    ss_seconds = row["train_s"]
                row["zero_shot_db"] = zero_db if zero_db is not None else ""
                row["gain_db"] = round(row["psnr_db"] - zero_db, 3) if zero_db is not None else ""
                rows.append(row)
                gain = f"({row['gain_db']:+.2f} dB)" if zero_db is not None else ""
                print(f"{structure:13s} {photons:4g} {method:16s} PSNR {row['psnr_db']:6.2f} dB {gain} "
                      f"SSIM {row['ssim']:.4f}  train {row['train_s']:6.1f} s  total {row['wall_s']:6.1f} s  "
                      f"{row['peak_rss_gb']:.2f} GB  {row['steps']} steps  {row['outcome']}  {extra}", flush=True)
                write_csv(rows, args.csv, COLUMNS)
                if "save_outputs" in spec:
                    saved[method] = np.load(spec["save_outputs"])
            if len(saved) == 2 and not pictured:
                try:
                    regions_picture(structure, photons, saved["zero-shot"], saved["self-supervised"],
                                    args.regions_png)
                    pictured = True
                except ImportError:
                    pass
    print(f"wrote {args.csv}")
    try:
        plot(rows, args.png)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")


if __name__ == "__main__":
    main()
