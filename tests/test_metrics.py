"""One PSNR convention: the truth's range as the peak, the output as it is (docs/metrics.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_cnnt.cli import build_parser
from napari_cnnt.io.hdf5 import write_training_pairs
from napari_cnnt.losses import CombinedLoss
from napari_cnnt.metrics import psnr_db, truth_range
from napari_cnnt.normalization import Normalization
from napari_cnnt.synthetic import simulate
from napari_cnnt.training.cli import _data
from napari_cnnt.training.trainer import metrics


def test_psnr_is_the_truth_range_over_the_rms_error_and_does_not_depend_on_the_scale():
    rng = np.random.default_rng(0)
    truth = rng.uniform(100, 900, (4, 16, 16))
    image = truth + rng.normal(0, 8, truth.shape)
    expected = 10 * np.log10((truth.max() - truth.min()) ** 2 / np.mean((image - truth) ** 2))
    assert psnr_db(image, truth) == pytest.approx(expected, rel=1e-12)
    low, high = 80.0, 1200.0  # a model's fixed normalisation: the same number on its [0, 1] scale
    assert psnr_db((image - low) / (high - low), (truth - low) / (high - low)) == pytest.approx(expected, rel=1e-9)
    assert truth_range(truth) == pytest.approx(truth.max() - truth.min())
    assert psnr_db(truth, truth) == float("inf")
    assert np.isnan(psnr_db(image, np.full_like(truth, 5.0)))
    with pytest.raises(ValueError, match="same shape"):
        psnr_db(image[:2], truth)


def test_training_metrics_use_the_given_peak_and_do_not_clip():
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.uniform(0, 1.6, (1, 2, 1, 8, 8)).astype(np.float32))  # bright parts above 1
    output = target + 0.05
    loss_fn = CombinedLoss(["mse"])
    loss, psnr, _ = metrics(output, target, loss_fn, peak=2.0)
    assert loss == pytest.approx(loss_fn(output, target).item())
    assert psnr == pytest.approx(psnr_db(output.numpy(), target.numpy(), peak=2.0), abs=1e-4)
    assert np.isnan(metrics(output, target, loss_fn, peak=0.0)[1])


def test_the_cli_does_not_test_on_training_samples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_training_pairs("train.h5", [simulate((2, 16, 16), ("puncta",), seed=s)[:2] for s in range(4)])
    args = build_parser().parse_args(["train", "--h5files", "train.h5", "--ratio", "100", "0", "0"])
    train, val, test, split = _data(args, Normalization())
    assert len(train) == 4 and test == []
    assert any("no test metrics: every test sample also trains" in note for note in split.notes)
    args = build_parser().parse_args(["train", "--h5files", "train.h5", "--ratio", "50", "0", "50"])
    train, val, test, split = _data(args, Normalization())
    assert len(test) == 2 and not {s.name for s in train} & {f"train.h5:{k}" for _, k in test}
