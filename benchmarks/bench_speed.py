"""How close CNNT gets to this machine's limit: float32 eager versus the fast path.

One run measures, side by side and interleaved (so both variants see the same
machine state), for the ``small`` and ``reference`` presets:

- the matrix-product peak of this machine in float32 and bfloat16
  (``torch.mm`` of 2048 x 2048 matrices);
- inference: the network alone on one ``[1, T, 1, H, W]`` tile, float32
  eager (the model as trained) versus the fast path (``Runtime.inference_copy``:
  bf16 weights, fused attention projections, fused and cache-blocked mixers,
  channels-last);
- one training step (forward, float32 ssim + mse loss, backward, clipping,
  AdamW) of a ``[B, T, 1, h, w]`` batch, float32 versus bf16 autocast;
- the sample data (32 x 256 x 256) denoised whole with the bundled model: the
  reference's method (its tile layout, float32), ``denoise`` in float32 and
  ``denoise`` on the fast path; time and PSNR against the truth.

Both variants run in one process with the same memory allocator settings:
importing napari_cnnt turns on PyTorch's huge-page allocation
(``THP_MEM_ALLOC_ENABLE``) on Linux. Run with ``THP_MEM_ALLOC_ENABLE=0`` to
measure with PyTorch's default instead.

It prints megapixel-frames per second, achieved GFLOP/s (forward FLOPs from
PyTorch's counter; a training step counts three times the forward), the
fraction of the measured matrix-product peak (float32 variants against the
float32 peak, fast ones against the bf16 peak) and the ratios. Usage::

    python benchmarks/bench_speed.py [--frames 16] [--size 128] [--batch 4] [--patch 64] [--repeats 3]
                                     [--threads N] [--presets small reference]
"""

from __future__ import annotations

import argparse
import os

import napari_cnnt  # before torch: it sets up the allocator (see above)
import torch

from bench_model import count_flops, timed  # the script's folder is on sys.path

from napari_cnnt.losses import CombinedLoss
from napari_cnnt.model import CNNTDenoiser, preset
from napari_cnnt.runtime import Runtime, cpu_has_native_bf16


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a square matrix product, the best of ``repeats``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    return 2 * n**3 / timed(lambda: torch.mm(a, b), repeats) / 1e9


def interleaved(fns: dict, repeats: int) -> dict:
    times = {k: float("inf") for k in fns}
    for fn in fns.values():  # warm-up: oneDNN primitive creation
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k] = min(times[k], timed(fn, 1))
    return times


def inference(name: str, args) -> dict:
    torch.manual_seed(0)
    model = CNNTDenoiser(preset(name)).eval()
    x = torch.rand(1, args.frames, 1, args.size, args.size)
    plain, fast = Runtime.create("cpu", fast=False), Runtime.create("cpu", fast=True)
    nets = {"float32": plain.prepare(model), "fast": fast.inference_copy(model)}
    runtimes = {"float32": plain, "fast": fast}
    fns = {k: (lambda k=k: runtimes[k].predict(nets[k], x)) for k in nets}
    out = {k: fn() for k, fn in fns.items()}
    rel = ((out["fast"] - out["float32"]).abs().max() / out["float32"].abs().max()).item()
    return dict(times=interleaved(fns, args.repeats), flops=count_flops(model, x), pf=x[0, :, 0].numel(), rel=rel)


def training(name: str, args) -> dict:
    torch.manual_seed(0)
    config = preset(name).replace(time=args.frames, height=args.patch, width=args.patch)
    x = torch.rand(args.batch, args.frames, 1, args.patch, args.patch)
    y = x.clone()
    loss_fn = CombinedLoss(["ssim", "mse"], [1.0, 0.1])
    fns = {}
    for label, flag in (("float32", False), ("fast", True)):
        rt = Runtime.create("cpu", fast=flag)
        model = rt.prepare(CNNTDenoiser(config).train())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model=model, rt=rt, opt=opt):
            with rt.autocast():
                out = model(x)
            loss = loss_fn(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        fns[label] = step
    flops = 3 * count_flops(CNNTDenoiser(config), x)
    return dict(times=interleaved(fns, args.repeats), flops=flops, pf=x[:, :, 0].numel(), rel=None)


def sample_denoising(repeats: int) -> dict[str, tuple[float, float]] | None:
    """Seconds and PSNR (dB) of denoising the sample data with the bundled model, three ways."""
    from napari_cnnt.metrics import psnr_db
    from napari_cnnt.synthetic import sample_recording

    try:
        model = napari_cnnt.load_model()
    except napari_cnnt.CheckpointError:
        return None
    noisy, clean = sample_recording()
    variants = {
        "reference's method": dict(layout="reference"),
        "float32": dict(device=Runtime.create("cpu", fast=False)),
        "fast": dict(device=Runtime.create("cpu", fast=True)),
    }
    outputs = {}

    def run(label: str) -> None:
        outputs[label] = napari_cnnt.denoise(noisy, model, **variants[label])

    times = interleaved({label: (lambda label=label: run(label)) for label in variants}, repeats)
    results = {label: (times[label], psnr_db(outputs[label], clean)) for label in variants}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=128, help="inference frame size")
    ap.add_argument("--batch", type=int, default=4, help="training batch")
    ap.add_argument("--patch", type=int, default=64, help="training patch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--presets", nargs="+", default=["small", "reference"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    peaks = {"float32": matmul_peak(torch.float32), "fast": matmul_peak(torch.bfloat16)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    print(f"matrix-product peak: float32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['fast']:.0f} GFLOP/s")
    print(f"inference [1, {args.frames}, 1, {args.size}, {args.size}]; training step "
          f"[{args.batch}, {args.frames}, 1, {args.patch}, {args.patch}]")
    print(f"{'preset':<10} {'work':<10} {'variant':<8} {'time s':>8} {'Mpf/s':>8} {'GFLOP/s':>8} {'of peak':>8} "
          f"{'ratio':>6}")
    for name in args.presets:
        for work, measure in (("inference", inference), ("train step", training)):
            r = measure(name, args)
            for label, t in r["times"].items():
                gflops = r["flops"] / t / 1e9
                ratio = r["times"]["float32"] / t
                print(f"{name:<10} {work:<10} {label:<8} {t:8.3f} {r['pf'] / t / 1e6:8.4f} {gflops:8.1f} "
                      f"{gflops / peaks[label]:8.1%} {ratio:5.2f}x", flush=True)
            if r["rel"] is not None:
                print(f"{'':<10} {work:<10} max |fast - float32| / max |float32| = {r['rel']:.2e} (random weights)")
    sample = sample_denoising(args.repeats)
    if sample is None:
        print("no bundled model: sample denoising skipped")
        return
    print("sample data 32 x 256 x 256, bundled model, whole-stack denoising:")
    base_time, base_psnr = sample["float32"]
    for label, (seconds, db) in sample.items():
        print(f"  {label:<20} {seconds:7.2f} s  {base_time / seconds:5.2f}x of float32  PSNR {db:.3f} dB "
              f"({db - base_psnr:+.3f} dB)")
    ratio = sample["reference's method"][0] / sample["fast"][0]
    print(f"  fast against the reference's method: {ratio:.2f}x")


if __name__ == "__main__":
    main()
