"""TIFF reading and writing without napari: files as Fiji, OME writers and instruments make them."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import tifffile

import napari_cnnt.io as cnnt_io
from napari_cnnt.io import ImageFileError, tiff

RNG = np.random.default_rng(11)


def _stack(shape, dtype):
    if np.dtype(dtype).kind == "f":
        return RNG.random(shape, dtype=np.float32).astype(dtype)
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def write_fiji_hyperstack(path, data):
    """A 2-channel ImageJ hyperstack with calibration, as Fiji saves it."""
    tifffile.imwrite(
        path, data, imagej=True, resolution=(1 / 0.65, 1 / 0.65),
        metadata={"axes": "TZCYX", "unit": "micron", "spacing": 2.5, "finterval": 30.0, "mode": "composite"},
    )


def test_imagej_hyperstack_axes_spacing_and_unit(tmp_path):
    data = _stack((3, 4, 2, 24, 20), np.uint16)
    path = tmp_path / "cells.tif"
    write_fiji_hyperstack(path, data)
    (im,) = tiff.read_tiff(path)
    assert (im.name, im.axes, im.unit) == ("cells", "TZCYX", "um")
    np.testing.assert_allclose(im.scale, (30.0, 2.5, 1.0, 0.65, 0.65))
    assert im.metadata["time_unit"] == "s"
    np.testing.assert_array_equal(im.data, data)


def test_ome_tiff_axes_physical_sizes_and_channel_names(tmp_path):
    data = _stack((2, 3, 4, 16, 18), np.uint8)
    path = tmp_path / "scan.ome.tif"
    tifffile.imwrite(
        path, data, ome=True, compression="zlib", tile=(16, 16),
        metadata={"axes": "TCZYX", "PhysicalSizeX": 120.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 130.0,
                  "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.5, "PhysicalSizeZUnit": "\u00b5m",
                  "TimeIncrement": 5.0, "Channel": {"Name": ["DAPI", "GFP", "RFP"]}},
    )
    (im,) = tiff.read_tiff(path)
    assert (im.name, im.axes, im.unit) == ("scan", "TCZYX", "nm")
    np.testing.assert_allclose(im.scale, (5.0, 1.0, 500.0, 130.0, 120.0))
    assert im.metadata["channel_names"] == ["DAPI", "GFP", "RFP"]
    np.testing.assert_array_equal(im.data, data)


def test_plain_multipage_is_a_time_lapse_and_centimetre_resolution_a_pixel_size(tmp_path):
    data = _stack((7, 30, 20), np.float32)
    path = tmp_path / "plain.tiff"
    with tifffile.TiffWriter(path) as tw:  # independent pages, no shape metadata, like many instruments
        for frame in data:
            tw.write(frame, photometric="minisblack", resolution=(25_000.0, 20_000.0), resolutionunit="CENTIMETER",
                     metadata=None)
    (im,) = tiff.read_tiff(path)
    assert (im.axes, im.unit) == ("TYX", "um")
    np.testing.assert_allclose(im.scale, (1.0, 0.5, 0.4))
    np.testing.assert_array_equal(im.data, data)


def test_bigtiff_and_rgb(tmp_path):
    data = _stack((4, 32, 32), np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", data, bigtiff=True, photometric="minisblack", metadata={"axes": "ZYX"})
    (im,) = tiff.read_tiff(tmp_path / "big.tif")
    assert im.axes == "ZYX"
    np.testing.assert_array_equal(im.data, data)

    rgb = _stack((16, 24, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    (im,) = tiff.read_tiff(tmp_path / "rgb.tif")
    assert im.axes == "YXS"
    np.testing.assert_array_equal(im.data, rgb)


def test_large_files_are_memory_mapped_or_decoded_on_access(tmp_path, monkeypatch):
    raw = _stack((6, 2, 32, 32), np.uint16)
    write_fiji_hyperstack(tmp_path / "raw.tif", raw[:, None])
    tifffile.imwrite(tmp_path / "packed.tif", raw, compression="zlib", photometric="minisblack",
                     metadata={"axes": "TCYX"})
    monkeypatch.setattr(cnnt_io, "LAZY_BYTES", 10_000)
    (mapped,) = tiff.read_tiff(tmp_path / "raw.tif")
    assert isinstance(mapped.data, np.memmap) and mapped.is_lazy
    (packed,) = tiff.read_tiff(tmp_path / "packed.tif")
    assert packed.is_lazy and not isinstance(packed.data, np.ndarray)
    assert packed.axes == "TCYX"
    assert mapped.axes == "TCYX"  # ImageJ drops the Z axis of length 1
    np.testing.assert_array_equal(mapped.data, raw)
    np.testing.assert_array_equal(np.asarray(packed.data[3, 1]), raw[3, 1])
    assert isinstance(tiff.read_tiff(tmp_path / "raw.tif", lazy_bytes=10**9)[0].data, np.ndarray)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("axes", ["YX", "TYX", "ZCYX", "TZCYX"])
def test_write_tiff_imagej_round_trip(tmp_path, dtype, axes):
    shape = (2, 3, 2, 12, 10)[5 - len(axes):]
    data = _stack(shape, dtype)
    scale = {"T": 4.0, "Z": 1.5, "C": 1.0, "Y": 0.2, "X": 0.3}
    path = tmp_path / "out.tif"
    tiff.write_tiff(path, data, axes=axes, scale=[scale[a] for a in axes])
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej and tif.series[0].axes == axes
    (im,) = tiff.read_tiff(path)
    assert (im.axes, im.unit) == (axes, "um")
    np.testing.assert_allclose(im.scale, [scale[a] for a in axes], rtol=1e-6)
    assert im.data.dtype == dtype
    np.testing.assert_array_equal(im.data, data)


def test_write_tiff_reorders_axes_for_imagej_and_writes_lazy_sources_plane_by_plane(tmp_path):
    data = _stack((2, 5, 12, 10), np.uint16)  # C, T, Y, X
    src = tmp_path / "src.h5"
    with h5py.File(src, "w") as f:
        f["img"] = data
    with h5py.File(src, "r") as f:
        tiff.write_tiff(tmp_path / "out.tif", f["img"], axes="CTYX", scale=(1, 2, 0.5, 0.5))
    (im,) = tiff.read_tiff(tmp_path / "out.tif")
    assert im.axes == "TCYX" and im.scale == (2.0, 1.0, 0.5, 0.5)
    np.testing.assert_array_equal(im.data, data.transpose(1, 0, 2, 3))


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint32])
def test_types_imagej_cannot_hold_are_written_as_ome(tmp_path, dtype):
    data = _stack((3, 2, 8, 9), dtype)
    path = tmp_path / "out.tif"
    tiff.write_tiff(path, data, axes="TZYX", scale=(1.0, 2.0, 0.25, 0.25))
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and not tif.is_imagej
    (im,) = tiff.read_tiff(path)
    assert (im.axes, im.scale, im.unit) == ("TZYX", (1.0, 2.0, 0.25, 0.25), "um")
    np.testing.assert_array_equal(im.data, data)


def test_unusual_axes_keep_their_scale_in_a_plain_tiff(tmp_path):
    data = _stack((3, 4, 8, 9), np.uint16)
    tiff.write_tiff(tmp_path / "odd.tif", data, axes="TEYX", scale=(2.0, 3.0, 0.5, 0.5), unit="nm")
    (im,) = tiff.read_tiff(tmp_path / "odd.tif")
    assert (im.axes, im.scale, im.unit) == ("TEYX", (2.0, 3.0, 0.5, 0.5), "nm")
    np.testing.assert_array_equal(im.data, data)


def test_write_tiff_is_atomic_and_keeps_the_source(tmp_path, monkeypatch):
    path = tmp_path / "a.tif"
    tiff.write_tiff(path, np.ones((4, 8, 8), np.uint16))
    before = path.read_bytes()
    with pytest.raises(ImageFileError, match="axes"):
        tiff.write_tiff(path, np.ones((4, 8, 8), np.uint16), axes="YX")
    monkeypatch.setattr(cnnt_io, "LAZY_BYTES", 0)
    (im,) = tiff.read_tiff(path)
    with pytest.raises(ImageFileError, match="refusing to overwrite"):
        tiff.write_tiff(path, im.data)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.tif"]


@pytest.mark.parametrize("kind", ["imagej", "zlib", "bigtiff", "ome"])
@pytest.mark.parametrize("fraction", [0.4, 0.97, 0.999])
def test_truncated_tiff_raises_a_clear_error(tmp_path, kind, fraction):
    data = _stack((6, 2, 32, 32), np.uint16)
    full = tmp_path / "full.tif"
    options = {
        "imagej": {"imagej": True, "metadata": {"axes": "TCYX"}},
        "zlib": {"compression": "zlib", "photometric": "minisblack"},
        "bigtiff": {"bigtiff": True, "photometric": "minisblack"},
        "ome": {"ome": True, "compression": "zlib", "tile": (16, 16), "metadata": {"axes": "TCYX"}},
    }[kind]
    tifffile.imwrite(full, data, **options)
    cut = tmp_path / "cut.tif"
    blob = full.read_bytes()
    cut.write_bytes(blob[: int(len(blob) * fraction)])
    with pytest.raises(ImageFileError, match=r"cut\.tif: TIFF file is truncated"):
        tiff.read_tiff(cut, lazy_bytes=0 if fraction > 0.9 else None)


def test_random_bytes_are_not_a_tiff(tmp_path):
    path = tmp_path / "noise.tif"
    path.write_bytes(RNG.bytes(2048))
    assert not tiff.is_tiff(path)
    with pytest.raises(ImageFileError, match=r"noise\.tif: not a TIFF file"):
        tiff.read_tiff(path)
    header_only = tmp_path / "header.tif"
    header_only.write_bytes(b"II*\x00" + RNG.bytes(64))
    with pytest.raises(ImageFileError, match=r"header\.tif"):
        tiff.read_tiff(header_only)
