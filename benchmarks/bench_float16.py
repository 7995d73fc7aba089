"""Float16 inference on this CPU: one batch of the tiles ``denoise`` runs, float32 against float16.

Prints the time of both and their largest difference. Usage::

    python benchmarks/bench_float16.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import napari_cnnt  # before torch: it sets up the allocator
from napari_cnnt.inference import auto_batch_size, auto_layout
from napari_cnnt.runtime import Runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model = napari_cnnt.load_model()
    rt = Runtime.create("cpu", fast=False)
    tile, _ = auto_layout(model.config, (32, 256, 256), rt)
    x = torch.rand(auto_batch_size(model.config, tile, rt), tile[0], 1, tile[1], tile[2])
    nets = {"float32": rt.inference_copy(model), "float16": rt.inference_copy(model, fused_float32=False).half()}
    out, best = {}, {}
    with torch.inference_mode():
        for label, net in nets.items():
            out[label] = net(x.to(next(net.parameters()).dtype)).float()
            best[label] = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                net(x.to(next(net.parameters()).dtype))
                best[label] = min(best[label], time.perf_counter() - start)
    print(f"batch {list(x.shape)}, bundled model, torch {torch.__version__}")
    for label, seconds in best.items():
        print(f"  {label:<8} {seconds:7.3f} s  {best['float32'] / seconds:5.2f}x")
    print(f"  max |float16 - float32| = {(out['float16'] - out['float32']).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
