"""``napari-cnnt train`` / ``finetune``: the reference's command lines, outputs, resume, torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_cnnt import load_model
from napari_cnnt.cli import main
from napari_cnnt.io.hdf5 import write_training_pairs
from napari_cnnt.model import CNNTConfig, CNNTDenoiser
from napari_cnnt.synthetic import simulate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SRC = Path(__file__).resolve().parents[1] / "src"

# The reference's documented fine-tuning command, at tiny sizes.
FINETUNE = """--h5files train.h5 --fine_samples 3 --test_case test.h5
--global_lr 0.000025 --skip_LSUV --num_epochs 2 --batch_size 2
--time 4 --width 16 32 --height 16 32 --loss ssim mse --loss_weights 1.0 0.1
--wandb_entity someone --run_name finetuning_run_0 --run_notes finetuning_default_model_with_30_epochs
--load_path backbone.pt""".split()

# A backbone run from scratch: the documented command's flags with a tiny model.
BACKBONE = """--h5files train.h5 --ratio 75 25 0 --global_lr 0.002 --num_epochs 2 --batch_size 4
--time 4 --width 16 --height 16 --loss ssim --loss_weights 1.0 --preset small --blocks 8 16
--n_head 2 --dropout_p 0 --im_value_scale 100 180 --seed 3 --no-fast""".split()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with training and test files and a reference-format backbone (.pt and .json)."""
    monkeypatch.chdir(tmp_path)
    write_training_pairs("train.h5", [simulate((6, 32, 32), ("puncta",), seed=s) for s in range(8)])
    write_training_pairs("test.h5", [simulate((6, 40, 40), ("puncta",), seed=s) for s in (20, 21)])
    run = {"blocks": [8, 16], "blocks_per_set": 1, "n_head": 2, "kernel_size": 3, "stride": 1, "padding": 1,
           "dropout_p": 0.0, "norm_mode": "instance", "with_mixer": 1, "time": 4, "height": [16], "width": [16],
           "per_scaling": False, "im_value_scale": [100, 180], "global_lr": 5e-4, "wandb_entity": "someone"}
    torch.manual_seed(0)
    torch.save(CNNTDenoiser(CNNTConfig.from_reference(run)).state_dict(), "backbone.pt")
    Path("backbone.json").write_text(json.dumps(run))
    return tmp_path


def _csv(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_reference_finetuning_command_runs_end_to_end(workdir, capsys):
    before = Path("train.h5").read_bytes()
    assert main(["train", *FINETUNE, "--no-fast"]) == 0
    err = capsys.readouterr().err
    assert "ignoring experiment-tracker option(s) --wandb_entity, --run_notes" in err
    assert "training on 3 sample(s)" in err and "validating on 5 sample(s)" in err
    assert "epoch 2/2: train loss" in err
    assert "step/s" in err or "s/step" in err  # the progress bar
    assert "test (2 whole stacks)" in err
    assert "recipe backbone: 2 epochs of 2 patches of 4 x 16 x 16, 32 x 32, lr 2.5e-05" in err
    assert "peak memory about" in err
    assert "kept epoch" in err or "kept the starting model: validation loss did not improve" in err

    model = load_model("logs/model/finetuning_run_0.safetensors")
    assert model.config.blocks == (8, 16)
    assert model.normalization.to_dict() == {"mode": "fixed", "low": 100.0, "high": 180.0}
    meta = model.metadata
    assert meta["base_model"] == "backbone.pt" and meta["epochs"] == 2
    assert meta["training_data"]["train"] == ["train.h5:sample_000", "train.h5:sample_001", "train.h5:sample_002"]
    assert meta["training"]["lr"] == 2.5e-5 and meta["training"]["loss"] == ["ssim", "mse"]
    assert "test_psnr" in meta["metrics"]
    rows = _csv("logs/results/finetuning_run_0_metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert Path("logs/check/finetuning_run_0.ckpt").is_file()
    assert "epoch 2/2" in Path("logs/logs/finetuning_run_0.log").read_text()
    assert Path("train.h5").read_bytes() == before


def test_rerunning_the_same_command_resumes(workdir, capsys):
    assert main(["finetune", *FINETUNE, "--no-fast", "--recipe", "reference"]) == 0
    first = _csv("logs/results/finetuning_run_0_metrics.csv")
    args = [*FINETUNE, "--no-fast", "--recipe", "reference"]
    args[args.index("--num_epochs") + 1] = "3"
    assert main(["finetune", *args]) == 0
    assert "resuming from logs/check/finetuning_run_0.ckpt" in capsys.readouterr().err
    rows = _csv("logs/results/finetuning_run_0_metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    np.testing.assert_equal(rows[:2], first)  # NaN where a metric was not measured


def test_backbone_training_from_scratch(workdir, capsys):
    assert main(["train", *BACKBONE, "--run_name", "bb", "-o", "bb.safetensors"]) == 0
    err = capsys.readouterr().err
    assert "training on 6 sample(s)" in err and "validating on 2 sample(s)" in err
    model = load_model("bb.safetensors")
    assert model.config.blocks == (8, 16) and model.config.time == 4
    assert "base_model" not in model.metadata
    assert model.metadata["training"]["lsuv"] is True


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--use_conv_3D"], "use_conv_3D"),
        (["--height", "16", "32"], "--height and --width"),
        (["--ratio", "0", "50", "50"], "ratio"),
        (["--h5files", "missing.h5"], "missing.h5: no such file"),
        (["--global_lr", "-1"], "lr must be"),
        (["--num_epochs", "0"], "epochs must be"),
        (["--loss", "ssim", "mse"], "one weight per loss"),
        (["--height", "1000", "--width", "1000"], "a patch of 1000 x 1000 is larger than every training sample "
                                                  "(the largest is 32 x 32); lower --height/--width to at most "
                                                  "32 x 32"),
        (["--batch_size", "1000000", "--height", "32", "--width", "32"], "available; lower --batch_size"),
        (["--time", "7"], "a time window of 7 frames is longer than every training stack (the longest has 6); "
                          "lower --time to at most 6"),
    ],
)
def test_bad_command_lines_end_with_one_line(workdir, capsys, extra, message):
    assert main(["train", *BACKBONE, *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("napari-cnnt train: error:")


def test_two_process_torchrun_matches_one_process(workdir, capsys):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    # Without LSUV this tiny model learns fast, so the epochs differ by far more than the tolerance.
    common = [*BACKBONE, "--skip_LSUV", "--num_epochs", "3", "--num_patches_per_train_sample", "2"]
    assert main(["train", *common, "--run_name", "single"]) == 0
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "napari_cnnt.cli", "train", *common,
         "--run_name", "ddp", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    assert result.stderr.count("epoch 3/3: train loss") == 1  # only rank 0 reports
    single, ddp = _csv("logs/results/single_metrics.csv"), _csv("logs/results/ddp_metrics.csv")
    assert single[-1]["val_loss"] < 0.8 * single[0]["val_loss"]
    assert len(single) == len(ddp) == 3
    for a, b in zip(single, ddp):
        for key in ("train_loss", "val_loss", "val_psnr"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), key
    assert sorted(p.name for p in Path("logs/model").iterdir()) == ["ddp.safetensors", "single.safetensors"]


def test_finetune_defaults_are_the_few_sample_recipe(workdir, capsys):
    assert main(["finetune", "--h5files", "train.h5", "--fine_samples", "3", "--load_path", "backbone.pt",
                 "--num_epochs", "2", "--steps_per_epoch", "2", "--no-fast", "--run_name", "few"]) == 0
    err = capsys.readouterr().err
    assert "recipe few-sample: 2 epochs x 2 steps of 4 patches of 6 x 32 x 32, lr 0.0002 (WarmupCosine)" in err
    meta = load_model("logs/model/few.safetensors").metadata
    assert meta["training"]["recipe"] == "few-sample" and meta["training"]["select"] == "val_psnr"
    assert meta["outcome"] in err


def test_finetune_without_a_model_says_how_to_give_one(workdir, capsys, monkeypatch):
    monkeypatch.setattr("napari_cnnt.model.checkpoint.BUNDLED_WEIGHTS", workdir / "absent.safetensors")
    args = FINETUNE[: FINETUNE.index("--load_path")]
    assert main(["finetune", *args]) == 1
    assert "start from a model file with --load_path MODEL" in capsys.readouterr().err
