"""HDF5 reading and writing without napari: instrument-style files, CNNT training files."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

import napari_cnnt.io as cnnt_io
from napari_cnnt.io import ImageFileError, hdf5

RNG = np.random.default_rng(7)


def _stack(shape, dtype):
    if np.dtype(dtype).kind == "f":
        return RNG.random(shape, dtype=np.float32).astype(dtype)
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


@pytest.fixture
def instrument_file(tmp_path):
    """Compressed, chunked datasets in nested groups, with the attributes Fiji and ilastik write."""
    path = tmp_path / "acquisition.h5"
    arrays = {
        "raw/t_stack": _stack((5, 40, 48), np.uint16),
        "raw/deep/zstack": _stack((3, 4, 40, 48), np.uint8),
        "processed/plane": _stack((40, 48), np.float32),
        "five_d": _stack((2, 3, 2, 16, 20), np.uint16),
    }
    with h5py.File(path, "w") as f:
        f.create_dataset("raw/t_stack", data=arrays["raw/t_stack"], chunks=(1, 20, 24), compression="gzip")
        f["raw/t_stack"].attrs["element_size_um"] = [1.0, 0.25, 0.25]
        f.create_dataset("raw/deep/zstack", data=arrays["raw/deep/zstack"], chunks=True, compression="lzf",
                         shuffle=True)
        f["raw/deep/zstack"].attrs["axistags"] = json.dumps(
            {"axes": [{"key": k, "typeFlags": 0} for k in "tzyx"]}
        )
        f["raw/deep/zstack"].attrs["element_size_um"] = [2.0, 0.5, 0.5]  # z, y, x only
        f.create_dataset("processed/plane", data=arrays["processed/plane"], compression="gzip", compression_opts=9)
        f.create_dataset("five_d", data=arrays["five_d"], chunks=(1, 1, 1, 16, 20))
        f["five_d"].attrs["axes"] = "TZCYX"
        f["five_d"].attrs["pixel_size"] = [0.1, 0.1]
        f["five_d"].attrs["unit"] = "nm"
        # Not images: a 1-D trace, an (N, 3) table, strings, a compound record.
        f["trace"] = np.arange(100.0)
        f["raw/coordinates"] = RNG.random((500, 3))
        f["names"] = np.array([b"a", b"b"])
        f["records"] = np.zeros(4, dtype=[("x", "f4"), ("y", "f4")])
    return path, arrays


def test_generic_file_reads_every_image_dataset_with_scale_and_axes(instrument_file):
    path, arrays = instrument_file
    images = {im.name: im for im in hdf5.read_hdf5(path)}
    assert sorted(images) == sorted(arrays)
    assert hdf5.list_image_datasets(path) == [im.name for im in hdf5.read_hdf5(path)]
    for name, expected in arrays.items():
        assert images[name].data.dtype == expected.dtype
        np.testing.assert_array_equal(images[name].data, expected)

    t_stack = images["raw/t_stack"]
    assert (t_stack.axes, t_stack.scale, t_stack.unit) == ("TYX", (1.0, 0.25, 0.25), "um")
    zstack = images["raw/deep/zstack"]
    assert (zstack.axes, zstack.scale, zstack.unit) == ("TZYX", (1.0, 2.0, 0.5, 0.5), "um")
    assert images["processed/plane"].axes == "YX" and images["processed/plane"].unit is None
    five = images["five_d"]
    assert (five.axes, five.scale, five.unit) == ("TZCYX", (1.0, 1.0, 1.0, 0.1, 0.1), "nm")


def test_dimension_scale_labels_name_the_axes(tmp_path):
    path = tmp_path / "labelled.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("img", data=np.zeros((3, 8, 9), np.uint16))
        for dim, label in zip(ds.dims, ("z", "y", "x")):
            dim.label = label
    (im,) = hdf5.read_hdf5(path)
    assert im.axes == "ZYX"


def _training_file(path, n=3, shape=(4, 16, 16), track_order=False, names=None):
    names = names or [f"img_{i}" for i in range(n)]
    pairs = {}
    with h5py.File(path, "w", track_order=track_order) as f:
        for name in names:
            noisy, clean = _stack(shape, np.uint16), _stack(shape, np.uint16)
            g = f.create_group(name)
            g.create_dataset("clean_im", data=clean, compression="gzip")  # clean first on purpose
            g.create_dataset("noisy_im", data=noisy, compression="gzip")
            pairs[name] = (noisy, clean)
    return pairs


def test_training_file_gives_noisy_clean_pairs_in_file_order(tmp_path):
    path = tmp_path / "train.h5"
    names = ["zebra", "alpha", "mid"]
    pairs = _training_file(path, names=names, track_order=True)
    images = hdf5.read_hdf5(path)
    assert [im.name for im in images] == [f"{s}/{r}" for s in names for r in ("noisy_im", "clean_im")]
    for im in images:
        sample, role = im.name.split("/")
        assert im.metadata["sample"] == sample
        assert im.metadata["role"] == role.removesuffix("_im")
        np.testing.assert_array_equal(im.data, pairs[sample][0 if role == "noisy_im" else 1])
        assert im.axes == "TYX"
    assert hdf5.is_training_file(path)

    read = hdf5.read_training_pairs(path)
    assert [name for name, _, _ in read] == names
    for name, noisy, clean in read:
        np.testing.assert_array_equal(noisy[()], pairs[name][0])
        np.testing.assert_array_equal(clean[()], pairs[name][1])


def test_training_file_without_creation_order_reads_like_the_reference(tmp_path):
    """Without tracked creation order h5py (and so the reference) lists samples by name."""
    path = tmp_path / "train.h5"
    _training_file(path, names=["b", "a"], track_order=False)
    assert [name for name, _, _ in hdf5.read_training_pairs(path)] == ["a", "b"]


def test_training_pairs_errors_name_the_file_and_sample(tmp_path, instrument_file):
    path = tmp_path / "broken.h5"
    with h5py.File(path, "w") as f:
        f["s1/noisy_im"] = np.zeros((2, 8, 8), np.uint16)
        f["s1/clean_im"] = np.zeros((2, 8, 8), np.uint16)
        f["s2/noisy_im"] = np.zeros((2, 8, 8), np.uint16)
    with pytest.raises(ImageFileError, match=r"broken\.h5.*'s2'.*clean_im"):
        hdf5.read_training_pairs(path)
    assert not hdf5.is_training_file(instrument_file[0])
    with pytest.raises(ImageFileError, match="no CNNT training samples"):
        hdf5.read_training_pairs(instrument_file[0])
    with h5py.File(path, "w") as f:
        f["s1/noisy_im"] = np.zeros((2, 8, 8), np.uint16)
        f["s1/clean_im"] = np.zeros((3, 8, 8), np.uint16)
    with pytest.raises(ImageFileError, match=r"'s1'.*same shape"):
        hdf5.read_training_pairs(path)


def test_large_datasets_stay_in_the_file(instrument_file, monkeypatch):
    path, arrays = instrument_file
    monkeypatch.setattr(cnnt_io, "LAZY_BYTES", 10_000)
    images = {im.name: im for im in hdf5.read_hdf5(path)}
    big = images["raw/t_stack"]  # 19 kB
    assert isinstance(big.data, h5py.Dataset) and big.is_lazy
    assert isinstance(images["processed/plane"].data, np.ndarray)  # 7.7 kB
    np.testing.assert_array_equal(big.data[2], arrays["raw/t_stack"][2])

    one = hdf5.read_dataset(path, "/five_d")
    assert isinstance(one.data, h5py.Dataset)
    assert (one.name, one.axes, one.scale[-2:]) == ("five_d", "TZCYX", (0.1, 0.1))
    with pytest.raises(ImageFileError, match="no dataset 'missing'"):
        hdf5.read_dataset(path, "missing")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("axes", ["YX", "TYX", "TZYX", "TZCYX"])
def test_write_hdf5_round_trip(tmp_path, dtype, axes):
    shape = (2, 3, 2, 12, 10)[5 - len(axes):]
    data = _stack(shape, dtype)
    scale = tuple(0.5 + i for i in range(len(axes)))
    path = tmp_path / "out.h5"
    hdf5.write_hdf5(path, "group/data", data, axes=axes, scale=scale)
    with h5py.File(path, "r") as f:
        ds = f["group/data"]
        assert ds.compression == "gzip" and ds.chunks is not None
        assert ds.attrs["axes"] == axes
        np.testing.assert_allclose(ds.attrs["element_size_um"], scale)
    (im,) = hdf5.read_hdf5(path)
    assert (im.name, im.axes, im.scale, im.unit) == ("group/data", axes, scale, "um")
    assert im.data.dtype == dtype
    np.testing.assert_array_equal(im.data, data)


def test_write_training_pairs_round_trip_from_lazy_sources(tmp_path):
    src = tmp_path / "src.h5"
    pairs = _training_file(src, n=2, shape=(3, 16, 20))
    read = hdf5.read_training_pairs(src)
    out = tmp_path / "export.h5"
    hdf5.write_training_pairs(out, [(n, c) for _, n, c in read] + [(np.ones((8, 8)), np.zeros((8, 8)))])
    back = hdf5.read_training_pairs(out)
    assert [name for name, _, _ in back] == ["sample_000", "sample_001", "sample_002"]
    for (_, noisy, clean), expected in zip(back, pairs.values()):
        np.testing.assert_array_equal(noisy[()], expected[0])
        np.testing.assert_array_equal(clean[()], expected[1])
    assert back[2][1].shape == (8, 8)
    with pytest.raises(ImageFileError, match="same shape"):
        hdf5.write_training_pairs(out, [(np.ones((4, 8, 8)), np.ones((8, 8)))])


def test_writes_are_atomic_and_never_replace_the_source(tmp_path):
    path = tmp_path / "data.h5"
    hdf5.write_hdf5(path, "a", np.ones((8, 8), np.uint8))
    before = path.read_bytes()
    with pytest.raises(ImageFileError, match="not numeric"):
        hdf5.write_hdf5(path, "a", np.array([["x"] * 8] * 8), overwrite=True)
    assert path.read_bytes() == before
    source = hdf5.read_dataset(path, "a")
    with pytest.raises(ImageFileError, match="refusing to overwrite"):
        hdf5.write_hdf5(path, "b", source.data)
    with pytest.raises(ImageFileError, match="refusing to overwrite"):
        hdf5.write_training_pairs(path, [(source.data, source.data)])
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["data.h5"]  # no temporary files left


def test_not_hdf5_truncated_and_corrupt_files_raise_clear_errors(tmp_path, instrument_file):
    random = tmp_path / "random.h5"
    random.write_bytes(RNG.bytes(4096))
    assert not hdf5.is_hdf5(random)
    with pytest.raises(ImageFileError, match=r"random\.h5: not an HDF5 file"):
        hdf5.read_hdf5(random)

    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(instrument_file[0].read_bytes()[:5000])
    assert hdf5.is_hdf5(truncated)
    with pytest.raises(ImageFileError, match=r"truncated\.h5: HDF5 file is truncated"):
        hdf5.read_hdf5(truncated)

    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(hdf5.SIGNATURE + RNG.bytes(4096))
    with pytest.raises(ImageFileError, match=r"corrupt\.h5: HDF5 file is corrupt"):
        hdf5.list_image_datasets(corrupt)
    with pytest.raises(ImageFileError, match="no such file"):
        hdf5.read_hdf5(tmp_path / "missing.h5")
