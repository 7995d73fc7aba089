"""Measure the bundled model's validation and test metrics, and optionally record them in its file.

The validation set is the one the model was trained with (24 recordings,
seeds 100000-100023, the recipe's ``val.h5``), measured exactly as training
measures it (the same fixed patches). The test set is 24 further recordings
of the trained structures that took no part in training or in choosing the
weights (seeds 200000-200023), denoised whole. PSNR follows napari-cnnt's
convention (docs/metrics.md). Usage::

    python benchmarks/bundled_metrics.py           # print the metrics
    python benchmarks/bundled_metrics.py --write   # also rewrite the metadata of the bundled file

``--write`` replaces only the file's JSON header: the tensor bytes stay
identical (checked before the file is replaced).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import threading
import time

import torch

import napari_cnnt
from napari_cnnt.model.checkpoint import BUNDLED_WEIGHTS, atomic_write
from napari_cnnt.runtime import Runtime
from napari_cnnt.synthetic import random_recording
from napari_cnnt.training.api import evaluate
from napari_cnnt.training.data import make_samples
from napari_cnnt.training.settings import TrainSettings
from napari_cnnt.training.trainer import Trainer

SHAPE = (16, 128, 128)
STRUCTURES = ("nucleus", "filaments", "puncta")
VAL_SEED, TEST_SEED, COUNT = 100_000, 200_000, 24


def recordings(seed: int, normalization) -> list:
    """``napari-cnnt simulate X.h5 --count 24 --shape 16 128 128 --structures nucleus filaments puncta
    --seed SEED``, in memory, as normalised samples."""
    out = []
    for i in range(COUNT):
        noisy, clean, _ = random_recording(SHAPE, seed=seed + i, structures=STRUCTURES)
        out += make_samples(f"sample_{i:03d}", noisy, clean, normalization)
    return out


def validation(model, settings: TrainSettings, samples: list, fast: bool) -> dict[str, float]:
    """The validation metrics training records, for the model's own weights (no step is taken)."""
    stop = threading.Event()
    stop.set()
    _, history = Trainer(model, samples, samples, settings, device="cpu", fast=fast, stop=stop).run()
    return history.initial


def split_file(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_header(header: dict, tensors: bytes) -> bytes:
    """A safetensors file: the header padded with spaces to 8 bytes, as safetensors writes it."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="record the metrics in the bundled model file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = napari_cnnt.load_model()
    meta = model.metadata
    recorded = {k: v for k, v in meta["training"].items() if k in TrainSettings.names()}
    settings = TrainSettings(**{**recorded, "lsuv": False})  # measure the weights as they are
    fast = Runtime.create("cpu").fast  # training ran on the fast path where the CPU has it
    t0 = time.perf_counter()
    val = validation(model, settings, recordings(VAL_SEED, model.normalization), fast)
    test = evaluate(model, recordings(TEST_SEED, model.normalization), loss=settings.loss,
                    loss_weights=settings.loss_weights, device="cpu", fast=fast)
    print(f"validation ({COUNT} recordings, patches as in training): loss {val['val_loss']:.5f}, "
          f"PSNR {val['val_psnr']:.2f} dB, SSIM {val['val_ssim']:.4f}")
    print(f"test ({COUNT} held-out recordings, whole stacks): loss {test['loss']:.5f}, PSNR {test['psnr']:.2f} dB, "
          f"SSIM {test['ssim']:.4f}  [{'bf16' if fast else 'float32'}, {time.perf_counter() - t0:.0f} s]")
    if not args.write:
        return

    metrics = {k: v for k, v in meta["metrics"].items() if not k.startswith("test_")}
    metrics.update(val)
    metrics.update({f"test_{k}": v for k, v in test.items()})
    meta["metrics"] = metrics
    meta["evaluation"] = {
        "psnr": "dB, peak = range (max - min) of each whole truth stack, output unclipped (docs/metrics.md)",
        "validation": f"the {COUNT} validation recordings (seeds {VAL_SEED}-{VAL_SEED + COUNT - 1}), "
                      "fixed patches as in training",
        "test": f"{COUNT} held-out recordings of {', '.join(STRUCTURES)}, 16 x 128 x 128, whole stacks: "
                f"napari-cnnt simulate test.h5 --count {COUNT} --shape 16 128 128 --structures "
                f"{' '.join(STRUCTURES)} --seed {TEST_SEED}",
        "arithmetic": "bf16 fast path" if fast else "float32",
    }
    old = BUNDLED_WEIGHTS.read_bytes()
    header, tensors = split_file(old)
    header["__metadata__"]["provenance"] = json.dumps(meta)
    new = with_header(header, tensors)
    assert hashlib.sha256(split_file(new)[1]).digest() == hashlib.sha256(tensors).digest()
    atomic_write(BUNDLED_WEIGHTS, new)
    print(f"wrote the metrics into {BUNDLED_WEIGHTS} (tensor bytes unchanged: sha256 "
          f"{hashlib.sha256(tensors).hexdigest()})")


if __name__ == "__main__":
    main()
