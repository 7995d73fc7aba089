"""What the Fine-tune widget's controls describe, tested without a display or a viewer."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from napari.layers import Image, Shapes

from napari_cnnt.io.hdf5 import write_training_pairs
from napari_cnnt.napari.widgets._messages import UserError
from napari_cnnt.napari.widgets.finetune_setup import (
    NO_CLEAN,
    FinetuneRun,
    file_data,
    finetune_options,
    layers_data,
    parse_learning_rate,
    parse_losses,
    parse_patch_sizes,
    recipe_controls,
    summary,
)
from napari_cnnt.napari.widgets.models import ModelEntry
from napari_cnnt.training.history import History
from napari_cnnt.training.recipes import RECIPES


def test_the_module_imports_without_qt():
    code = ("import sys, napari_cnnt.napari.widgets.finetune_setup; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_parsing_the_text_fields():
    assert parse_losses("ssim 1.0, mse 0.1") == (["ssim", "mse"], [1.0, 0.1])
    assert parse_losses("SSIM3d; l1*0.5") == (["ssim3D", "l1"], [1.0, 0.5])
    assert parse_patch_sizes("128, 160x96") == [(128, 128), (160, 96)]
    assert parse_patch_sizes(" Auto ") is None
    assert parse_learning_rate("2.5e-5") == 2.5e-5
    for bad in ("", "ssim one", "ssim 1 2", "ssim, psnr"):
        with pytest.raises(UserError):
            parse_losses(bad)
    for bad in ("", "a", "128x", "0", "1x2x3"):
        with pytest.raises(UserError):
            parse_patch_sizes(bad)
    for bad in ("0", "fast", "1.5"):
        with pytest.raises(UserError):
            parse_learning_rate(bad)


@pytest.mark.parametrize("name", ["few-sample", "self-supervised", "reference"])
def test_a_recipe_shown_in_the_controls_passes_no_options(name):
    """The controls start at the recipe's values, and only changes become ``finetune`` options."""
    recipe = RECIPES[name]
    controls = recipe_controls(recipe)
    assert finetune_options(recipe, controls) == {}
    changed = {**controls, "epochs": controls["epochs"] + 1, "losses": "l1 2", "patch_sizes": "32, 48x16"}
    assert finetune_options(recipe, changed) == {
        "epochs": recipe.settings.epochs + 1, "loss": ("l1",), "loss_weights": (2.0,),
        "patch_sizes": ((32, 32), (48, 16)),
    }


def test_samples_from_layers_regions_and_a_noisy_layer_alone():
    noisy = Image(np.random.default_rng(0).random((3, 4, 32, 40)).astype(np.float32), name="noisy")
    clean = Image(np.zeros((3, 4, 32, 40), np.float32), name="clean")
    data = layers_data(noisy, clean, first=2, regions="whole images", n_val=1)
    assert data.names() == ["noisy #0", "noisy #1"]
    assert data.split_text() == "Training on noisy #0; validating on noisy #1."
    train, val = data.load()
    np.testing.assert_array_equal(train[0][0], noisy.data[0])
    np.testing.assert_array_equal(val[0][1], clean.data[1])

    boxes = Shapes([np.array([[2, 3], [2, 20], [18, 20], [18, 3]])], shape_type="rectangle", name="boxes")
    data = layers_data(noisy, clean, first=1, regions=boxes, n_val=0)
    (pair,), where = data.load()
    assert where == "regions" and pair[2] == (2, 3, 18, 20)

    alone = layers_data(noisy, NO_CLEAN, first=0, regions="whole images", n_val=0)
    assert [p[1] for p in alone.load()[0]] == [None, None, None]
    assert alone.source == "layer 'noisy' (noisy, no clean image)"


def test_choices_that_cannot_train_are_explained():
    noisy = Image(np.zeros((4, 32, 32), np.float32), name="noisy")
    with pytest.raises(UserError, match="both 'noisy'"):
        layers_data(noisy, noisy, 0, "whole images", 0)
    with pytest.raises(UserError, match="same shape: 'noisy' is 4 x 32 x 32, 'small' is 4 x 16 x 16"):
        layers_data(noisy, Image(np.zeros((4, 16, 16), np.float32), name="small"), 0, "whole images", 0)
    with pytest.raises(UserError, match="at most 0 can be held out"):
        layers_data(noisy, Image(np.ones((4, 32, 32), np.float32), name="clean"), 0, "whole images", 1)


def test_samples_from_a_training_file(tmp_path):
    path = tmp_path / "pairs.h5"
    rng = np.random.default_rng(1)
    pairs = [(rng.random((4, 16, 16)).astype(np.float32), rng.random((4, 16, 16)).astype(np.float32))
             for i in range(5)]
    write_training_pairs(path, pairs, names=[f"s{i}" for i in range(5)])
    data = file_data(path, first=4, n_val=1)
    assert data.names() == ["pairs.h5:s0", "pairs.h5:s1", "pairs.h5:s2", "pairs.h5:s3"]
    train, val = data.load()
    np.testing.assert_array_equal(val[0][0], pairs[3][0])
    with pytest.raises(UserError, match="Choose a CNNT HDF5 training file"):
        file_data(tmp_path / "missing.h5", 0, 0)


def test_a_run_records_what_it_trained_on():
    noisy = Image(np.zeros((4, 32, 32), np.float32), name="cells")
    data = layers_data(noisy, Image(np.ones((4, 32, 32), np.float32), name="truth"), 0, "whole images", 0)
    run = FinetuneRun(ModelEntry("Bundled model"), data, "few-sample", {"epochs": 3, "lr": 1e-4})
    assert run.epochs == 3 and run.model_name() == "Bundled model fine-tuned on cells"
    assert run.provenance() == {"training_source": "layers 'cells' (noisy) and 'truth' (clean)",
                                "fine_tuning": {"recipe": "few-sample", "epochs": 3, "lr": 1e-4}}
    assert FinetuneRun(ModelEntry("m"), data, "reference", {}).epochs == RECIPES["reference"].settings.epochs


def test_summary_of_a_run_that_kept_its_start():
    history = History(records=[{"epoch": 1, "val_psnr": 30.0}], initial={"val_psnr": 31.0}, metric="val_psnr")
    assert summary(history, 4) == "Finished 4 epochs; kept the starting model: validation PSNR did not improve."
    history.stopped = True
    assert summary(history, 4).startswith("Stopped after 1 of 4 epochs; kept the starting model")
