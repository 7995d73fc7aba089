"""Opening files in a real napari viewer through the plugin (run under xvfb-run)."""

from __future__ import annotations

import dask.array as da
import h5py
import numpy as np
import pytest
import tifffile

import napari_cnnt.io as cnnt_io
from napari_cnnt.errors import ImageFileError
from napari_cnnt.napari.reader import get_reader

pytestmark = pytest.mark.gui
PLUGIN = "napari-cnnt"
RNG = np.random.default_rng(5)


def _stack(shape, dtype):
    if np.dtype(dtype).kind == "f":
        return RNG.random(shape, dtype=np.float32).astype(dtype)
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def _units(layer):
    return tuple(str(u) for u in layer.units)


def test_imagej_hyperstack_with_two_channels_opens_as_two_channel_layers(make_napari_viewer, tmp_path):
    data = _stack((3, 4, 2, 20, 24), np.uint16)
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "TZCYX", "unit": "micron", "spacing": 1.5, "finterval": 10.0})
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)
    assert [layer.name for layer in layers] == ["cells [C0]", "cells [C1]"]
    assert [layer.colormap.name for layer in layers] == ["magenta", "green"]
    for c, layer in enumerate(layers):
        np.testing.assert_array_equal(layer.data, data[:, :, c])
        np.testing.assert_allclose(layer.scale, (10.0, 1.5, 0.5, 0.5))
        assert layer.axis_labels == ("T", "Z", "Y", "X")
        assert _units(layer) == ("second", "micrometer", "micrometer", "micrometer")


def test_ome_tiff_opens_with_channel_names_and_physical_sizes(make_napari_viewer, tmp_path):
    data = _stack((2, 3, 16, 18), np.float32)
    path = tmp_path / "scan.ome.tiff"
    tifffile.imwrite(path, data, ome=True, metadata={
        "axes": "CZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 1.0,
        "Channel": {"Name": ["DAPI", "GFP"]},
    })
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)
    assert [layer.name for layer in layers] == ["scan [DAPI]", "scan [GFP]"]
    for c, layer in enumerate(layers):
        np.testing.assert_array_equal(layer.data, data[c])
        np.testing.assert_allclose(layer.scale, (1.0, 0.3, 0.3))
        assert layer.axis_labels == ("Z", "Y", "X")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("bigtiff", [False, True])
def test_plain_multipage_and_bigtiff_open_as_time_lapses(make_napari_viewer, tmp_path, dtype, bigtiff):
    data = _stack((5, 16, 20), dtype)
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for frame in data:
            tw.write(frame, photometric="minisblack", metadata=None)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(path, plugin=PLUGIN)
    assert layer.data.dtype == dtype
    np.testing.assert_array_equal(layer.data, data)
    assert layer.axis_labels == ("T", "Y", "X")
    np.testing.assert_allclose(layer.scale, (1.0, 1.0, 1.0))


def test_hdf5_from_an_instrument_opens_every_image_dataset(make_napari_viewer, tmp_path):
    path = tmp_path / "acq.hdf5"
    t_stack, plane = _stack((4, 24, 20), np.uint16), _stack((24, 20), np.float32)
    five = _stack((2, 2, 3, 8, 9), np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("exp/ch0/stack", data=t_stack, chunks=(1, 24, 20), compression="gzip")
        f["exp/ch0/stack"].attrs["element_size_um"] = [5.0, 0.2, 0.2]
        f.create_dataset("exp/mean", data=plane, compression="lzf")
        f.create_dataset("five", data=five, chunks=True, compression="gzip")
        f["five"].attrs["axes"] = "tzcyx"
        f["table"] = RNG.random((200, 3))
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)
    assert [layer.name for layer in layers] == ["exp/ch0/stack", "exp/mean", "five [C0]", "five [C1]", "five [C2]"]
    np.testing.assert_array_equal(layers[0].data, t_stack)
    np.testing.assert_allclose(layers[0].scale, (5.0, 0.2, 0.2))
    assert layers[0].axis_labels == ("T", "Y", "X")
    assert _units(layers[0])[1:] == ("micrometer", "micrometer")
    np.testing.assert_array_equal(layers[1].data, plane)
    assert layers[1].axis_labels == ("Y", "X")
    for c in range(3):
        np.testing.assert_array_equal(layers[2 + c].data, five[:, :, c])
        assert layers[2 + c].axis_labels == ("T", "Z", "Y", "X")


def test_training_file_opens_as_pairs_in_file_order(make_napari_viewer, tmp_path):
    path = tmp_path / "train.h5"
    arrays = {}
    with h5py.File(path, "w", track_order=True) as f:
        for name in ("s10", "s2"):
            arrays[name] = _stack((2, 3, 16, 16), np.uint16)
            f.create_dataset(f"{name}/clean_im", data=arrays[name][1], compression="gzip")
            f.create_dataset(f"{name}/noisy_im", data=arrays[name][0], compression="gzip")
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)
    assert [layer.name for layer in layers] == ["s10/noisy_im", "s10/clean_im", "s2/noisy_im", "s2/clean_im"]
    for layer in layers:
        sample, role = layer.name.split("/")
        np.testing.assert_array_equal(layer.data, arrays[sample][0 if role == "noisy_im" else 1])
        assert layer.metadata["sample"] == sample and layer.axis_labels == ("T", "Y", "X")


def test_large_files_open_lazily(make_napari_viewer, tmp_path, monkeypatch):
    stack = _stack((6, 32, 40), np.uint16)  # 15 kB, declared large below
    with h5py.File(tmp_path / "big.h5", "w") as f:
        f.create_dataset("stack", data=stack, chunks=(1, 32, 40), compression="gzip")
    tifffile.imwrite(tmp_path / "packed.tif", stack, compression="zlib", photometric="minisblack")
    tifffile.imwrite(tmp_path / "raw.tif", stack, imagej=True, metadata={"axes": "TYX"})
    monkeypatch.setattr(cnnt_io, "LAZY_BYTES", 4096)
    viewer = make_napari_viewer()

    (h5_layer,) = viewer.open(tmp_path / "big.h5", plugin=PLUGIN)
    assert isinstance(h5_layer.data, da.Array)
    sources = [v for v in dict(h5_layer.data.dask).values() if isinstance(v, h5py.Dataset)]
    assert len(sources) == 1 and sources[0].id.valid  # reads from the open file, nothing loaded up front
    (packed,) = viewer.open(tmp_path / "packed.tif", plugin=PLUGIN)
    assert isinstance(packed.data, da.Array)
    (raw,) = viewer.open(tmp_path / "raw.tif", plugin=PLUGIN)
    assert isinstance(raw.data, np.memmap)

    viewer.dims.set_point(0, 4)
    for layer in (h5_layer, packed, raw):
        np.testing.assert_array_equal(np.asarray(layer.data[4]), stack[4])
        np.testing.assert_array_equal(np.asarray(layer._slice.image.view), stack[4])


def test_files_the_plugin_cannot_use_say_why(tmp_path):
    (tmp_path / "noise.h5").write_bytes(RNG.bytes(3000))
    (tmp_path / "noise.tif").write_bytes(RNG.bytes(3000))
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with h5py.File(tmp_path / "tables.h5", "w") as f:
        f["trace"] = np.arange(50.0)
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.zeros((8, 8), np.uint8))
    for name in ("image.png", "missing.tif"):  # other kinds of files, and missing ones, are for other readers
        assert get_reader(str(tmp_path / name)) is None, name
    reasons = {"noise.h5": "not an HDF5 file", "noise.tif": "not a TIFF file", "empty.tif": "the file is empty",
               "tables.h5": "holds no image datasets"}
    for name, reason in reasons.items():
        reader = get_reader(str(tmp_path / name))
        with pytest.raises(ImageFileError, match=f"{name}: {reason}"):
            reader(str(tmp_path / name))
    with pytest.raises(ImageFileError, match="noise.tif: not a TIFF file"):
        get_reader([str(good), str(tmp_path / "noise.tif")])([str(good), str(tmp_path / "noise.tif")])
    assert len(get_reader([str(good), str(good)])([str(good), str(good)])) == 2


def test_damaged_files_give_a_clear_error_and_the_viewer_keeps_working(make_napari_viewer, tmp_path):
    full = tmp_path / "full.h5"
    with h5py.File(full, "w") as f:
        f.create_dataset("x", data=_stack((4, 32, 32), np.uint16), compression="gzip")
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(full.read_bytes()[:2000])
    cut_tif = tmp_path / "cut.tif"
    tifffile.imwrite(tmp_path / "full.tif", _stack((4, 32, 32), np.uint16), imagej=True, metadata={"axes": "TYX"})
    cut_tif.write_bytes((tmp_path / "full.tif").read_bytes()[:3000])
    noise = tmp_path / "noise.tif"
    noise.write_bytes(RNG.bytes(3000))

    viewer = make_napari_viewer()
    with pytest.raises(ValueError, match=r"cut\.h5: HDF5 file is truncated"):
        viewer.open(truncated, plugin=PLUGIN)
    with pytest.raises(ValueError, match=r"cut\.tif: TIFF file is truncated"):
        viewer.open(cut_tif, plugin=PLUGIN)
    with pytest.raises(ValueError, match=r"noise\.tif: not a TIFF file"):
        viewer.open(noise, plugin=PLUGIN)
    assert len(viewer.layers) == 0
    (layer,) = viewer.open(tmp_path / "full.tif", plugin=PLUGIN)
    assert layer.data.shape == (4, 32, 32)
