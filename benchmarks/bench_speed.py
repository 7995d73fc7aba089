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
- with ``--reference PATH`` (a CNNT_Microscopy checkout): the reference code's
  own float32 forward on the same tile and weights (``reference_code.py``)
  against napari-cnnt's default inference path;
- the sample data (32 x 256 x 256) denoised whole with the bundled model: the
  reference's method (its tile layout, float32; with ``--reference`` its own
  ``running_inference`` and network), ``denoise`` in float32 and
  on the fast path with the training patch as tile (a quarter overlap), and
  ``denoise`` as it runs by default; time, PSNR against the truth, the
  redundancy of each tile layout (voxel-frames computed per output
  voxel-frame) and the peak resident memory during each run.

It names the instruction sets it ran with: run it once natively and once in
AVX2 mode (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
NAPARI_CNNT_DISABLE_BF16=1``), which makes oneDNN and ATen behave as on a CPU
with AVX2 only.

Both variants run in one process with the same memory allocator settings:
importing napari_cnnt turns on PyTorch's huge-page allocation
(``THP_MEM_ALLOC_ENABLE``) on Linux. Run with ``THP_MEM_ALLOC_ENABLE=0`` to
measure with PyTorch's default instead.

It prints megapixel-frames per second, achieved GFLOP/s (forward FLOPs from
PyTorch's counter; a training step counts three times the forward), the
fraction of the measured matrix-product peak (float32 variants against the
float32 peak, fast ones against the bf16 peak) and the ratios. Usage::

    python benchmarks/bench_speed.py [--frames 16] [--size 128] [--batch 4] [--patch 64] [--repeats 3]
                                     [--threads N] [--presets small reference] [--reference PATH]
                                     [--work inference training sample]
"""

from __future__ import annotations

import argparse
import os

import torch
from bench_model import count_flops, isa_line, timed  # the script's folder is on sys.path

import napari_cnnt  # before torch: it sets up the allocator (see above)
from napari_cnnt.losses import CombinedLoss
from napari_cnnt.model import CNNTDenoiser, preset
from napari_cnnt.runtime import Runtime, cpu_has_native_bf16, fast_path_unavailable, float32_fusion_pays


def reset_peak() -> None:
    """Start a new resident-memory peak (Linux: ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a square matrix product, the best of ``repeats``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    return 2 * n**3 / timed(lambda: torch.mm(a, b), repeats) / 1e9


def interleaved(fns: dict, repeats: int, warm_up: bool = True) -> dict:
    times = {k: float("inf") for k in fns}
    for fn in fns.values() if warm_up else ():  # oneDNN primitive creation
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k] = min(times[k], timed(fn, 1))
    return times


def inference(name: str, args) -> dict:
    torch.manual_seed(0)
    model = CNNTDenoiser(preset(name)).eval()
    x = torch.rand(1, args.frames, 1, args.size, args.size)
    runtimes = {"float32": Runtime.create("cpu", fast=False), "default": Runtime.create("cpu")}
    if fast_path_unavailable(torch.device("cpu")) is None:
        runtimes["fast"] = Runtime.create("cpu", fast=True)
    nets = {k: rt.prepare(model) if k == "float32" else rt.inference_copy(model) for k, rt in runtimes.items()}
    if runtimes["default"].fast or not float32_fusion_pays(model.config):  # else "default" is this one
        runtimes["f32 fused"] = runtimes["float32"]
        nets["f32 fused"] = runtimes["float32"].inference_copy(model, fused_float32=True)
    if args.reference:
        from reference_code import reference_network

        nets["ref code"] = reference_network(args.reference, model)
        runtimes["ref code"] = runtimes["float32"]
    fns = {k: (lambda k=k: runtimes[k].predict(nets[k], x)) for k in nets}
    out = {k: fn() for k, fn in fns.items()}
    scale = out["float32"].abs().max()
    rel = {k: ((y - out["float32"]).abs().max() / scale).item() for k, y in out.items() if k != "float32"}
    times = interleaved(fns, args.repeats, warm_up=False)  # computing ``out`` warmed them up
    return dict(times=times, flops=count_flops(model, x), pf=x[0, :, 0].numel(), rel=rel)


def training(name: str, args) -> dict:
    torch.manual_seed(0)
    config = preset(name).replace(time=args.frames, height=args.patch, width=args.patch)
    x = torch.rand(args.batch, args.frames, 1, args.patch, args.patch)
    y = x.clone()
    loss_fn = CombinedLoss(["ssim", "mse"], [1.0, 0.1])
    fns = {}
    flags = (("float32", False), ("fast", True)) if fast_path_unavailable(torch.device("cpu")) is None else (
        ("float32", False),)
    for label, flag in flags:
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
    return dict(times=interleaved(fns, args.repeats), flops=flops, pf=x[:, :, 0].numel(), rel={})


def reference_method(root: str, model, noisy):
    """The reference's own whole-image inference (``running_inference.py`` of a
    CNNT_Microscopy checkout) with its own network holding ``model``'s weights:
    its tile layout, a quarter of the training patch as overlap, float32.
    ``noisy`` is normalised with the model's limits first and the result mapped
    back, as ``denoise`` does."""
    from reference_code import reference_inference, reference_network

    running_inference = reference_inference(root)
    net = reference_network(root, model)
    c = model.config
    lo, hi = model.normalization.limits(noisy)
    image = ((noisy - lo) / (hi - lo)).astype("float32")

    def run():
        out, _ = running_inference(net, image, cutout=(c.time, c.height, c.width),
                                   overlap=(c.time // 4, c.height // 4, c.width // 4))
        return out * (hi - lo) + lo

    return run


def sample_denoising(repeats: int, reference: str | None = None) -> dict[str, dict] | None:
    """Seconds, PSNR (dB), tile redundancy and peak memory of denoising the sample data with the bundled model.

    The baseline is the reference's method: with ``reference`` (a checkout) its
    own code, otherwise ``denoise(layout="reference")``, which computes the same
    numbers with napari-cnnt's float32 copy of the network."""
    from napari_cnnt.inference import TilePlan, auto_layout
    from napari_cnnt.metrics import psnr_db
    from napari_cnnt.synthetic import sample_recording

    try:
        model = napari_cnnt.load_model()
    except napari_cnnt.CheckpointError:
        return None
    noisy, clean = sample_recording()
    config = model.config
    patch = dict(tile=(config.time, config.height, config.width),
                 overlap=(config.time // 4, config.height // 4, config.width // 4))
    default = Runtime.create("cpu")
    variants = {
        "reference's method": dict(layout="reference"),
        "float32, patch tiles": dict(device=Runtime.create("cpu", fast=False), **patch),
        "default, patch tiles": dict(device=default, **patch),
        "default": dict(),
    }
    plans = {"reference's method": TilePlan.create(noisy.shape, patch["tile"], patch["overlap"], "reference"),
             "default": TilePlan.create(noisy.shape, *auto_layout(config, noisy.shape, default))}
    for label in ("float32, patch tiles", "default, patch tiles"):
        plans[label] = TilePlan.create(noisy.shape, patch["tile"], patch["overlap"])
    outputs, peaks = {}, {}

    calls = {label: (lambda kw=kw: napari_cnnt.denoise(noisy, model, **kw)) for label, kw in variants.items()}
    if reference:
        calls["reference's method"] = reference_method(reference, model, noisy)

    def run(label: str) -> None:
        reset_peak()
        before = peak_mb()
        outputs[label] = calls[label]()
        peaks[label] = peak_mb() - before

    # Hundreds of tiles a run: the first tile's set-up is a small share, so no warm-up run.
    times = interleaved({label: (lambda label=label: run(label)) for label in variants}, repeats, warm_up=False)
    return {label: dict(seconds=times[label], psnr=psnr_db(outputs[label], clean), tiles=len(plans[label]),
                        redundancy=plans[label].redundancy, peak_mb=peaks[label]) for label in variants}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=128, help="inference frame size")
    ap.add_argument("--batch", type=int, default=4, help="training batch")
    ap.add_argument("--patch", type=int, default=64, help="training patch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--presets", nargs="+", default=["small", "reference"])
    ap.add_argument("--reference", help="a CNNT_Microscopy checkout, to time the reference code itself")
    ap.add_argument("--work", nargs="+", choices=("inference", "training", "sample"),
                    default=["inference", "training", "sample"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(isa_line(), flush=True)
    peaks = {"float32": matmul_peak(torch.float32)}
    # Emulated bf16 (no AVX-512) takes minutes for one product and is no peak.
    peaks["fast"] = matmul_peak(torch.bfloat16) if fast_path_unavailable(torch.device("cpu")) is None else float("nan")
    peaks["default"] = peaks["fast" if Runtime.create("cpu").fast else "float32"]
    peaks["ref code"] = peaks["f32 fused"] = peaks["float32"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}, "
          f"default path: {'bf16 fast path' if Runtime.create('cpu').fast else 'float32'}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    print(f"matrix-product peak: float32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['fast']:.0f} GFLOP/s")
    print(f"inference [1, {args.frames}, 1, {args.size}, {args.size}]; training step "
          f"[{args.batch}, {args.frames}, 1, {args.patch}, {args.patch}]")
    print(f"{'preset':<10} {'work':<10} {'variant':<8} {'time s':>8} {'Mpf/s':>8} {'GFLOP/s':>8} {'of peak':>8} "
          f"{'ratio':>6}")
    works = [w for w in (("inference", inference), ("train step", training))
             if w[0].split()[0].replace("train", "training") in args.work]
    for name in args.presets:
        for work, measure in works:
            r = measure(name, args)
            for label, t in r["times"].items():
                gflops = r["flops"] / t / 1e9
                ratio = r["times"]["float32"] / t
                print(f"{name:<10} {work:<10} {label:<8} {t:8.3f} {r['pf'] / t / 1e6:8.4f} {gflops:8.1f} "
                      f"{gflops / peaks[label]:8.1%} {ratio:5.2f}x", flush=True)
            for label, rel in r["rel"].items():
                print(f"{'':<10} {work:<10} max |{label} - float32| / max |float32| = {rel:.2e} (random weights)")
            if "ref code" in r["times"]:
                print(f"{'':<10} {work:<10} default path against the reference code: "
                      f"{r['times']['ref code'] / r['times']['default']:.2f}x", flush=True)
    if "sample" not in args.work:
        return
    sample = sample_denoising(args.repeats, args.reference)
    if sample is None:
        print("no bundled model: sample denoising skipped")
        return
    print("sample data 32 x 256 x 256, bundled model, whole-stack denoising; the reference's method runs "
          + ("the reference code (running_inference.py and its network)" if args.reference
             else "denoise(layout='reference')") + ", float32:")
    base = sample["reference's method"]
    for label, r in sample.items():
        print(f"  {label:<22} {r['seconds']:7.2f} s  {base['seconds'] / r['seconds']:5.2f}x  PSNR {r['psnr']:.3f} dB "
              f"({r['psnr'] - base['psnr']:+.3f} dB)  {r['tiles']:4d} tiles, redundancy {r['redundancy']:.2f}  "
              f"peak +{r['peak_mb']:.0f} MB", flush=True)
    print(f"  default against the reference's method: {base['seconds'] / sample['default']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
