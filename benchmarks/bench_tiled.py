"""Tiled whole-stack denoising: ``denoise`` against a plain implementation of the reference.

Part 1 denoises one stack (default 32 x 512 x 512, ``small`` preset) three ways
and prints them side by side:

- ``plain``: the reference's algorithm as section 9 of docs/cnnt.md
  describes it (every tile cut into one array, run, blended with numpy;
  ``tests/reference_tiling.py``);
- ``denoise reference``: ``denoise(layout="reference")``, which must give the
  same numbers;
- ``denoise auto``: the default layout (fewer tiles) with the same tile size;
- ``denoise default``: ``denoise`` with its automatic tile and overlap.

For each also the tile layout's redundancy: voxel-frames through the network
per voxel-frame of output. The first line names the CPU's instruction sets and
whether the run was in AVX2 mode (``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 NAPARI_CNNT_DISABLE_BF16=1``).

For each: wall time, time inside the network, the share outside it, and the
peak resident memory above what the process held before the call (model
loaded, input in memory, one warm-up batch run). ``network alone`` is one
batch through the network, the part of every peak that tiling cannot avoid.

Part 2 denoises an HDF5 dataset into an HDF5 dataset for growing stack
lengths and shows that peak memory does not grow with them.

Every measurement runs in a fresh Python process, so that memory one variant
freed cannot hide another's. Peak memory is read from Linux's VmHWM after
resetting it (``/proc/self/clear_refs``); elsewhere it falls back to the
process's lifetime peak (less precise).

    python benchmarks/bench_tiled.py            # the issue's sizes
    python benchmarks/bench_tiled.py --quick    # a small run while developing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # reference_tiling: the plain implementation


# ----------------------------------------------------------------------------- memory
def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak() -> float:
    """Start a new peak measurement; returns the resident memory now, in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss = _status_mb("VmRSS")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
    return rss


def peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB elsewhere


# ----------------------------------------------------------------------------- one measurement
def worker(spec: dict) -> dict:
    """Run one variant in this (fresh) process and report its numbers."""
    import torch

    from napari_cnnt.inference import TilePlan, auto_layout, denoise  # before torch: it sets up the allocator
    from napari_cnnt.model import CNNTDenoiser, preset
    from napari_cnnt.runtime import Runtime

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    config = preset(spec["preset"])
    if spec.get("tiny"):
        config = config.replace(blocks=(8, 8, 8), pre_channels=(4, 8), n_head=2)
    model = CNNTDenoiser(config).eval()
    runtime = Runtime.create(spec["device"], fast=spec["fast"])
    tile, overlap, batch = tuple(spec["tile"]), tuple(spec["overlap"]), spec["batch_size"]

    network_seconds = 0.0
    predict = Runtime.predict

    def timed_predict(self, net, x):
        nonlocal network_seconds
        start = time.perf_counter()
        y = predict(self, net, x)
        if y.is_cuda:
            torch.cuda.synchronize()
        network_seconds += time.perf_counter() - start
        return y

    Runtime.predict = timed_predict

    net = runtime.inference_copy(model)  # the network denoise runs
    warm = torch.rand(batch, tile[0], 1, tile[1], tile[2])
    runtime.predict(net, warm)  # load kernels before measuring

    result: dict = {"variant": spec["variant"]}
    if spec["variant"] == "hdf5":
        import h5py

        src_file = h5py.File(spec["input"], "r")
        dst_file = h5py.File(spec["output"], "w")
        source = src_file["raw"]
        target = dst_file.create_dataset("denoised", shape=source.shape, dtype="f4", chunks=(1,) + source.shape[1:])
        shape = source.shape
    else:
        shape = tuple(spec["shape"])
        image = np.random.default_rng(0).random(shape, dtype=np.float32)

    network_seconds = 0.0
    base = reset_peak()
    start = time.perf_counter()
    if spec["variant"] == "network":
        runtime.predict(net, warm)
        tiles = batch
    elif spec["variant"] == "plain":
        from reference_tiling import reference_tiled_inference

        def run_batch(x):
            return runtime.predict(net, torch.from_numpy(x)).cpu().numpy()

        output = reference_tiled_inference(run_batch, image, tile, overlap, batch)
    elif spec["variant"] == "hdf5":
        denoise(source, model, tile=tile, overlap=overlap, batch_size=batch, device=runtime, layout="auto",
                normalization={"mode": "fixed", "low": 0, "high": 4096}, out=target)
        plan = TilePlan.create(shape, tile, overlap, "auto")
    elif spec["variant"] == "denoise default":
        output = denoise(image, model, device=runtime, normalization="none")
        plan = TilePlan.create(shape, *auto_layout(config, shape, runtime))
    else:
        layout = spec["variant"].split()[1]
        output = denoise(image, model, tile=tile, overlap=overlap, batch_size=batch, device=runtime,
                         layout=layout, normalization="none")
        plan = TilePlan.create(shape, tile, overlap, layout)
    seconds = time.perf_counter() - start
    if spec["variant"] in ("network", "plain"):
        plan = TilePlan.create(shape, tile, overlap, "reference")
    tiles = len(plan) if spec["variant"] != "network" else tiles
    result.update(seconds=seconds, network_seconds=network_seconds, peak_extra_mb=peak_mb() - base, tiles=tiles,
                  redundancy=plan.redundancy if spec["variant"] != "network" else None)
    if spec.get("save"):
        np.save(spec["save"], output)
    return result


def measure(spec: dict) -> dict:
    """Run ``worker(spec)`` in a fresh Python process."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['variant']} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the report
def part1(args: argparse.Namespace, common: dict, tmp: Path) -> None:
    shape = (args.frames, args.size, args.size)
    stack_mb = 4 * np.prod(shape) / 2**20
    print(f"\n== 1. one stack {shape[0]} x {shape[1]} x {shape[2]} float32 ({stack_mb:.0f} MB), "
          f"preset {args.preset!r}, tile {tuple(common['tile'])}, overlap {tuple(common['overlap'])}, "
          f"batch {common['batch_size']}, {common['device']}, {'bf16 fast path' if common['fast'] else 'float32'}")
    rows = []
    for variant in ("network", "plain", "denoise reference", "denoise auto", "denoise default"):
        save = str(tmp / f"{variant.replace(' ', '_')}.npy") if variant != "network" else None
        r = measure({**common, "variant": variant, "shape": shape, "save": save})
        rows.append(r)
        print(f"   measured {variant} ({r['seconds']:.1f} s)", file=sys.stderr)

    print(f"{'variant':<20}{'tiles':>7}{'redundancy':>11}{'time s':>9}{'network s':>11}{'outside':>9}"
          f"{'peak extra MB':>15}")
    for r in rows:
        outside = 1 - r["network_seconds"] / r["seconds"]
        redundancy = "-" if r["redundancy"] is None else f"{r['redundancy']:.2f}"
        print(f"{r['variant']:<20}{r['tiles']:>7}{redundancy:>11}{r['seconds']:>9.1f}{r['network_seconds']:>11.1f}"
              f"{outside:>9.1%}{r['peak_extra_mb']:>15.0f}")

    by = {r["variant"]: r for r in rows}
    plain = np.load(tmp / "plain.npy")
    same = np.abs(np.load(tmp / "denoise_reference.npy") - plain).max()
    auto = np.abs(np.load(tmp / "denoise_auto.npy") - plain).max()
    net_mb = by["network"]["peak_extra_mb"]
    print(f"max |denoise reference - plain| = {same:.2e}  (goal: <= 1e-5)")
    print(f"max |denoise auto - plain|      = {auto:.2e}  (other tiles, so not equal; for scale only)")
    for name in ("denoise reference", "denoise auto"):
        r = by[name]
        print(f"{name}: peak extra {r['peak_extra_mb'] / by['plain']['peak_extra_mb']:.2f} x plain's "
              f"(goal: <= 0.5); without the network's own {net_mb:.0f} MB: "
              f"{(r['peak_extra_mb'] - net_mb):.0f} MB vs {(by['plain']['peak_extra_mb'] - net_mb):.0f} MB; "
              f"time {r['seconds'] / by['plain']['seconds']:.2f} x plain's; "
              f"outside the network {1 - r['network_seconds'] / r['seconds']:.1%} (goal: < 5 %)")
    print(f"tiles: auto {by['denoise auto']['tiles']}, default {by['denoise default']['tiles']} "
          f"vs reference {by['plain']['tiles']}; redundancy {by['denoise default']['redundancy']:.2f} by default "
          f"vs {by['plain']['redundancy']:.2f} in the reference's layout")


def part2(args: argparse.Namespace, common: dict, tmp: Path) -> None:
    import h5py

    size = args.grow_size
    print(f"\n== 2. HDF5 -> HDF5, {size} x {size} uint16 frames (gzip, one chunk per frame), "
          f"float32 output; {'a tiny network' if args.grow_tiny else 'preset ' + repr(args.preset)}")
    print(f"{'frames':>7}{'input MB':>10}{'output MB':>11}{'tiles':>7}{'time s':>9}{'peak extra MB':>15}")
    rng = np.random.default_rng(0)
    for frames in args.grow:
        src = tmp / f"in_{frames}.h5"
        with h5py.File(src, "w") as f:
            ds = f.create_dataset("raw", shape=(frames, size, size), dtype="u2", chunks=(1, size, size),
                                  compression="gzip", compression_opts=1)
            for i in range(frames):
                ds[i] = rng.integers(0, 4096, (size, size), dtype=np.uint16)
        r = measure({**common, "variant": "hdf5", "tiny": args.grow_tiny, "input": str(src),
                     "output": str(tmp / f"out_{frames}.h5")})
        in_mb, out_mb = 2 * frames * size * size / 2**20, 4 * frames * size * size / 2**20
        print(f"{frames:>7}{in_mb:>10.0f}{out_mb:>11.0f}{r['tiles']:>7}{r['seconds']:>9.1f}{r['peak_extra_mb']:>15.0f}")
        src.unlink()
        (tmp / f"out_{frames}.h5").unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--preset", default="small")
    p.add_argument("--tile", type=int, nargs=3, default=(16, 128, 128))
    p.add_argument("--overlap", type=int, nargs=3, default=(4, 32, 32))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: torch's choice); 1 is steadier on a shared machine")
    p.add_argument("--exact", action="store_true", help="float32 everywhere instead of the bf16 fast path")
    p.add_argument("--grow", type=int, nargs="+", default=(64, 128, 256), help="stack lengths for part 2")
    p.add_argument("--grow-size", type=int, default=512)
    p.add_argument("--grow-tiny", action=argparse.BooleanOptionalAction, default=True,
                   help="part 2 with a tiny network, so the run measures the pipeline (default: on)")
    p.add_argument("--skip", choices=("1", "2"), action="append", default=[])
    p.add_argument("--quick", action="store_true", help="a small run: 16 x 256 x 256, part 2 with 16 and 32 frames")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.frames, args.size, args.grow, args.grow_size = 16, 256, (16, 32), 256

    import torch

    from napari_cnnt.runtime import Runtime

    runtime = Runtime.create(args.device, fast=False if args.exact else None)
    common = {"preset": args.preset, "tile": list(args.tile), "overlap": list(args.overlap),
              "batch_size": args.batch_size, "device": str(runtime.device), "fast": runtime.fast,
              "threads": args.threads}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_model import isa_line

    print(isa_line())
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} before the run")
    with tempfile.TemporaryDirectory(prefix="bench_tiled_") as tmp:
        if "1" not in args.skip:
            part1(args, common, Path(tmp))
        if "2" not in args.skip:
            part2(args, common, Path(tmp))


if __name__ == "__main__":
    main()
