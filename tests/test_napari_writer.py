"""Saving layers through the plugin's writers in a real napari viewer, and reading them back."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile

from napari_cnnt.io import hdf5

pytestmark = pytest.mark.gui
PLUGIN = "napari-cnnt"
RNG = np.random.default_rng(9)


def test_image_layer_to_imagej_tiff_and_back(make_napari_viewer, tmp_path):
    data = RNG.integers(0, 4000, (4, 3, 20, 24), dtype=np.uint16)
    viewer = make_napari_viewer()
    viewer.add_image(data, name="stack", scale=(30.0, 2.0, 0.5, 0.25), axis_labels=("T", "Z", "Y", "X"),
                     units=("s", "um", "um", "um"))
    path = tmp_path / "stack.tif"
    assert viewer.layers.save(str(path), plugin=PLUGIN) == [str(path)]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej and tif.series[0].axes == "TZYX"
        assert tif.imagej_metadata["unit"] == "micron" and tif.imagej_metadata["spacing"] == 2.0
    (layer,) = viewer.open(path, plugin=PLUGIN)
    np.testing.assert_array_equal(layer.data, data)
    np.testing.assert_allclose(layer.scale, (30.0, 2.0, 0.5, 0.25))
    assert layer.axis_labels == ("T", "Z", "Y", "X")


def test_float64_layer_without_labels_is_saved_as_ome_tiff(make_napari_viewer, tmp_path):
    data = RNG.random((3, 16, 16))
    viewer = make_napari_viewer()
    viewer.add_image(data, scale=(1.0, 0.1, 0.1))
    path = tmp_path / "float.tif"
    viewer.layers.save(str(path), plugin=PLUGIN)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
    (layer,) = viewer.open(path, plugin=PLUGIN)
    np.testing.assert_array_equal(layer.data, data)
    np.testing.assert_allclose(layer.scale, (1.0, 0.1, 0.1))
    assert layer.axis_labels == ("T", "Y", "X")


def test_layers_to_hdf5_datasets(make_napari_viewer, tmp_path):
    a = RNG.integers(0, 255, (5, 12, 14), dtype=np.uint8)
    b = RNG.random((12, 14), dtype=np.float32)
    viewer = make_napari_viewer()
    viewer.add_image(a, name="movie", scale=(2.0, 0.3, 0.3), axis_labels=("T", "Y", "X"), units=("s", "um", "um"))
    viewer.add_image(b, name="run1/mean")
    path = tmp_path / "layers.h5"
    viewer.layers.save(str(path), plugin=PLUGIN)
    images = {im.name: im for im in hdf5.read_hdf5(path)}
    assert list(images) == ["movie", "run1/mean"]
    np.testing.assert_array_equal(images["movie"].data, a)
    assert images["movie"].axes == "TYX" and images["movie"].scale == (2.0, 0.3, 0.3)
    assert images["movie"].unit == "um"
    np.testing.assert_array_equal(images["run1/mean"].data, b)


def test_noisy_and_clean_layers_to_a_training_file(make_napari_viewer, tmp_path):
    noisy = RNG.integers(90, 200, (4, 16, 16), dtype=np.uint16)
    clean = RNG.random((4, 16, 16), dtype=np.float32)
    viewer = make_napari_viewer()
    viewer.add_image(clean, name="ground truth clean")  # the clean one first: found by name
    viewer.add_image(noisy, name="raw noisy")
    path = tmp_path / "finetune.h5"
    viewer.layers.save(str(path), plugin=f"{PLUGIN}.write_training_pairs")
    ((name, n, c),) = hdf5.read_training_pairs(path)
    assert name == "sample_000"
    np.testing.assert_array_equal(n[()], noisy)
    np.testing.assert_array_equal(c[()], clean)


def test_training_file_read_and_saved_again_keeps_its_layout(make_napari_viewer, tmp_path):
    src = tmp_path / "train.h5"
    pairs = [(RNG.integers(0, 999, (3, 8, 8), dtype=np.uint16), RNG.integers(0, 999, (3, 8, 8), dtype=np.uint16))
             for _ in range(2)]
    hdf5.write_training_pairs(src, pairs, names=["cell_a", "cell_b"])
    viewer = make_napari_viewer()
    viewer.open(src, plugin=PLUGIN)
    out = tmp_path / "copy.h5"
    viewer.layers.save(str(out), plugin=f"{PLUGIN}.write_training_pairs")
    back = hdf5.read_training_pairs(out)
    assert [name for name, _, _ in back] == ["cell_a", "cell_b"]
    for (_, n, c), (en, ec) in zip(back, pairs):
        np.testing.assert_array_equal(n[()], en)
        np.testing.assert_array_equal(c[()], ec)
    with h5py.File(out) as f:
        assert sorted(f["cell_a"]) == ["clean_im", "noisy_im"]

    viewer.layers.remove("cell_b/clean_im")
    with pytest.raises(RuntimeError, match="'cell_b' needs both"):
        viewer.layers.save(str(tmp_path / "bad.h5"), plugin=f"{PLUGIN}.write_training_pairs")
    assert not (tmp_path / "bad.h5").exists()
