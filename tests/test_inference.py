"""Tiled whole-stack denoising: layout, blending, lazy inputs and outputs, progress, cancellation."""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading

import h5py
import numpy as np
import pytest
import reference_fixtures
import torch
from reference_tiling import reference_tiled_inference
from skimage.util import view_as_windows

import napari_cnnt
from napari_cnnt import inference
from napari_cnnt.inference import AxisLayout, Cancelled, TilePlan, denoise, ramp
from napari_cnnt.model import CNNTConfig, CNNTDenoiser
from napari_cnnt.normalization import Normalization
from napari_cnnt.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = CNNTConfig(blocks=(8, 8), blocks_per_set=1, n_head=2, pre_channels=(4, 8), time=4, height=16, width=16)
EXACT = Runtime.create("cpu", fast=False)


def tiny_model(config: CNNTConfig = TINY, seed: int = 0) -> CNNTDenoiser:
    torch.manual_seed(seed)
    model = CNNTDenoiser(config).eval()
    model.normalization = Normalization("fixed", 0.0, 1.0)
    return model


class Pointwise(CNNTDenoiser):
    """Each output voxel a fixed function of its input voxel: tiling must not show at all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return x * x - 0.5 * x


def pointwise(f: torch.Tensor | np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    return f * f - 0.5 * f


def pointwise_model(config: CNNTConfig = TINY) -> Pointwise:
    model = Pointwise(config).eval()
    model.normalization = Normalization.none()
    return model


def rng_stack(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).random(shape, dtype=np.float32).astype(dtype)


# ----------------------------------------------------------------------------- layout
def test_ramp_fades_linearly_over_the_overlap():
    np.testing.assert_allclose(ramp(6, 2), [0.5, 1, 1, 1, 1, 0.5])
    np.testing.assert_allclose(ramp(8, 4), [0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25])
    np.testing.assert_array_equal(ramp(5, 0), np.ones(5))


def test_reference_layout_wastes_a_whole_stride_but_auto_does_not():
    # The example of docs/cnnt.md section 9: 8 tiles where 1 suffices.
    shape, tile, overlap = (16, 128, 128), (16, 128, 128), (4, 32, 32)
    assert len(TilePlan.create(shape, tile, overlap, "reference")) == 8
    assert len(TilePlan.create(shape, tile, overlap, "auto")) == 1
    # The benchmark's stack.
    shape = (32, 512, 512)
    assert len(TilePlan.create(shape, tile, overlap, "reference")) == 108
    assert len(TilePlan.create(shape, tile, overlap, "auto")) == 75


@pytest.mark.parametrize("size", [16, 17, 30, 47, 48, 49, 100, 513])
@pytest.mark.parametrize("tile,overlap", [(16, 4), (16, 0), (8, 7), (1, 0)])
def test_spread_layout_covers_the_axis_with_the_fewest_tiles(size, tile, overlap):
    axis = AxisLayout.spread(size, tile, overlap)
    if size <= tile:
        assert axis.starts == (0,)
        return
    starts = axis.starts
    assert starts[0] == 0 and starts[-1] + tile == size and axis.pad_before == 0
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    # One tile fewer could not cover the axis with the requested overlap.
    assert (len(starts) - 1) * (tile - overlap) + overlap < size


@pytest.mark.parametrize("shape", [(20, 150, 170), (6, 48, 48), (3, 10, 7), (1, 5, 5)])
def test_reference_layout_cuts_the_same_tiles_in_the_same_order(shape):
    tile, overlap = (8, 64, 64), (2, 16, 16)
    image = rng_stack(shape)
    stride = tuple(c - o for c, o in zip(tile, overlap))
    padded = np.pad(image, [(o, s - n % s) for n, o, s in zip(shape, overlap, stride)], "symmetric")
    expected = view_as_windows(padded, tile, stride).reshape(-1, *tile)
    plan = TilePlan.create(shape, tile, overlap, "reference")
    got = np.stack([plan.read(image, start) for start in plan.starts()])
    np.testing.assert_array_equal(got, expected)


def test_weight_sum_is_the_sum_of_the_tiles_ramps():
    plan = TilePlan.create((11, 37, 50), (4, 16, 16), (1, 4, 6), "auto")
    full = np.zeros(plan.shape)
    weight = plan.weight()
    for start in plan.starts():
        crops = [a.crop(s) for a, s in zip(plan.axes, start)]
        full[tuple(c[0] for c in crops)] += weight[tuple(c[1] for c in crops)]
    t, h, w = (a.weight_sum() for a in plan.axes)
    np.testing.assert_allclose(full, t[:, None, None] * h[None, :, None] * w[None, None, :], rtol=1e-6)
    assert full.min() > 0


# ----------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("layout", ["auto", "reference"])
@pytest.mark.parametrize("shape", [(9, 37, 45), (4, 16, 16), (1, 20, 30), (3, 7, 5)])
def test_tiling_does_not_show_for_a_pointwise_model(layout, shape):
    image = rng_stack(shape, seed=3)
    y = denoise(image, pointwise_model(), tile=(4, 16, 16), overlap=(1, 4, 4), layout=layout, device=EXACT)
    np.testing.assert_allclose(y, pointwise(image), atol=1e-6)


@pytest.mark.parametrize("shape,tile,overlap", [
    ((10, 40, 36), (4, 16, 16), (1, 4, 4)),
    ((8, 32, 32), (4, 16, 16), (2, 8, 8)),  # sizes divisible by the stride
    ((3, 12, 20), (4, 16, 16), (1, 4, 4)),  # smaller than a tile everywhere
])
def test_reference_layout_reproduces_the_reference_algorithm(shape, tile, overlap):
    model = tiny_model()
    image = rng_stack(shape, seed=5)

    def predict(x):
        return EXACT.predict(model, torch.from_numpy(np.ascontiguousarray(x))).numpy()

    expected = reference_tiled_inference(predict, image, tile, overlap, batch_size=3)
    got = denoise(image, model, tile=tile, overlap=overlap, batch_size=3, layout="reference", normalization="none")
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_one_tile_over_the_whole_stack_is_the_plain_network():
    model = tiny_model()
    image = rng_stack((4, 16, 24), seed=2)
    with torch.inference_mode():
        expected = model(torch.from_numpy(image)[None, :, None])[0, :, 0].numpy()
    got = denoise(image, model, tile=(4, 16, 24), device=EXACT)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("name", reference_fixtures.TILED)
def test_reference_layout_matches_the_reference_fixtures(name):
    """Stacks denoised by the reference's own tiling code, with its models, reproduced to 1e-5."""
    folder, tiled = reference_fixtures.FOLDER, reference_fixtures.META[name]["tiled"]
    model = napari_cnnt.load_model(folder / f"{name}.pt")
    fixture = np.load(folder / f"{name}_tiled_io.npz")
    got = denoise(fixture["image"], model, tile=tiled["cutout"], overlap=tiled["overlap"],
                  batch_size=tiled["batch_size"], layout="reference", normalization="none", device="cpu")
    np.testing.assert_allclose(got, fixture["output"], atol=1e-5, rtol=0)


def test_reference_layout_matches_the_full_size_reference_fixture(fixtures_dir):
    """The 12 M-parameter reference model over 64 tiles: the slowest test (minutes on 2 cores)."""
    model = napari_cnnt.load_model(fixtures_dir / "seedfmt_default.pt")
    fixture = np.load(fixtures_dir / "seedfmt_default_tiled_io.npz")
    got = denoise(fixture["image"], model, tile=(8, 64, 64), overlap=(2, 16, 16), batch_size=4,
                  layout="reference", normalization="none", device="cpu")
    np.testing.assert_allclose(got, fixture["output"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- shapes and dtypes
@pytest.mark.parametrize("shape", [(1, 20, 30), (3, 50, 50), (5, 13, 17), (2, 2, 2)])
def test_odd_sizes_short_stacks_and_tiny_images_run(shape):
    config = TINY.replace(blocks=(8, 8, 8))  # H and W must be multiples of 4
    image = rng_stack(shape, seed=1)
    y = denoise(image, tiny_model(config), device=EXACT)
    assert y.shape == shape and y.dtype == np.float32 and np.isfinite(y).all()


def test_a_2d_image_is_one_frame():
    model = tiny_model()
    image = rng_stack((24, 20), seed=4)
    y = denoise(image, model, device=EXACT)
    assert y.shape == (24, 20)
    np.testing.assert_allclose(y, denoise(image[None], model, device=EXACT)[0], atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float64, np.float16])
def test_integer_and_float_inputs_come_back_in_their_units(dtype):
    image = (rng_stack((5, 20, 24), seed=7) * 200).astype(dtype)
    model = pointwise_model()
    model.normalization = Normalization("fixed", 0.0, 255.0)
    y = denoise(image, model, tile=(4, 16, 16), device=EXACT)
    x = image.astype(np.float64) / 255.0
    np.testing.assert_allclose(y, pointwise(x) * 255.0, rtol=1e-5, atol=1e-4)


def test_percentile_limits_are_computed_over_the_whole_stack():
    image = rng_stack((6, 40, 40), seed=8) * 1000 + 50
    image[:, :20] *= 3  # tiles differ in range; per-tile limits would show
    model = pointwise_model()
    model.normalization = Normalization("percentile", 1.5, 99.5)
    lo, hi = np.percentile(image, [1.5, 99.5])
    y = denoise(image, model, tile=(4, 16, 16), device=EXACT)
    want = pointwise((image - lo) / (hi - lo)) * (hi - lo) + lo
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6 * (hi - lo))


@pytest.mark.parametrize("normalization", ["none", Normalization("percentile", 1.5, 99.5), None])
def test_a_constant_image_gives_a_finite_result(normalization):
    image = np.full((4, 20, 20), 7, dtype=np.uint16)
    y = denoise(image, tiny_model(), normalization=normalization, device=EXACT)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_clearly(bad):
    image = rng_stack((4, 20, 20))
    image[2, 5, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinite values .first at frame 2, row 5, column 5"):
        denoise(image, tiny_model(), device=EXACT)


def test_inputs_are_left_untouched():
    image = rng_stack((5, 20, 20))
    before = image.copy()
    model = tiny_model()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    y1 = denoise(image, model, device=EXACT)
    y2 = denoise(image, model, device=EXACT)
    np.testing.assert_array_equal(image, before)
    np.testing.assert_array_equal(y1, y2)  # ran in eval mode: no dropout
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ----------------------------------------------------------------------------- array-likes
def test_hdf5_in_and_out(tmp_path):
    image = rng_stack((6, 30, 26), seed=9)
    model = tiny_model()
    expected = denoise(image, model, device=EXACT)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        src = f.create_dataset("raw", data=image, chunks=(1, 30, 26))
        dst = f.create_dataset("clean", shape=image.shape, dtype="f4")
        assert denoise(src, model, out=dst, device=EXACT) is dst
        np.testing.assert_allclose(dst[()], expected, atol=1e-6)
        with pytest.raises(ValueError, match="must not be the input"):
            denoise(src, model, out=f["raw"], device=EXACT)


def test_dask_zarr_and_memmap_inputs(tmp_path):
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    image = rng_stack((5, 21, 19), seed=10)
    model = pointwise_model()
    expected = pointwise(image)
    z = zarr.open_array(str(tmp_path / "z.zarr"), mode="w", shape=image.shape, chunks=(2, 8, 8), dtype="f4")
    z[:] = image
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype="f4", shape=image.shape)
    mm[:] = image
    for source in (da.from_array(image, chunks=(2, 10, 10)), z, mm):
        np.testing.assert_allclose(denoise(source, model, device=EXACT), expected, atol=1e-6)


class CountingReads:
    """An array-like that records what is read from it."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        block = self.array[key]
        self.reads.append(block.shape)
        return block


def test_each_time_window_is_read_once():
    image = rng_stack((10, 40, 36))
    source = CountingReads(image)
    plan = TilePlan.create(image.shape, (4, 16, 16), (1, 4, 4), "auto")
    y = denoise(source, pointwise_model(), tile=(4, 16, 16), overlap=(1, 4, 4), batch_size=4, device=EXACT)
    np.testing.assert_allclose(y, pointwise(image), atol=1e-6)
    assert len(source.reads) == len(plan.axes[0].starts) < len(plan)
    assert all(shape == (4, 40, 36) for shape in source.reads)


def test_reading_ahead_in_a_thread_gives_the_same_result(monkeypatch):
    image = rng_stack((9, 40, 36), seed=12)
    model = tiny_model()
    inline = denoise(image, model, batch_size=3, device=EXACT)
    threads = []

    def thread_pool(device):
        threads.append(device)
        return concurrent.futures.ThreadPoolExecutor(max_workers=1)

    monkeypatch.setattr(inference, "_reader", thread_pool)
    np.testing.assert_array_equal(denoise(image, model, batch_size=3, device=EXACT), inline)
    image[7, 3, 4] = np.nan
    with pytest.raises(ValueError, match="first at frame 7, row 3, column 4"):
        denoise(image, model, batch_size=3, device=EXACT)
    assert len(threads) == 2


def test_integer_out_is_rounded_and_clipped():
    image = np.array([[[0.0, 0.4], [0.6, 1.0]]] * 2, dtype=np.float32) * 301 - 50  # -50 .. 251
    model = pointwise_model()
    model.forward = lambda x: x  # identity
    out = np.zeros(image.shape, dtype=np.uint8)
    denoise(image, model, out=out, device=EXACT)
    np.testing.assert_array_equal(out, np.clip(np.rint(image), 0, 255))


def test_out_must_match_the_input_shape_and_not_alias_it():
    image = rng_stack((4, 16, 16))
    with pytest.raises(ValueError, match="shape"):
        denoise(image, tiny_model(), out=np.zeros((4, 16, 15), np.float32))
    with pytest.raises(ValueError, match="must not be the input"):
        denoise(image, tiny_model(), out=image)


# ----------------------------------------------------------------------------- extra axes
def test_leading_axes_are_denoised_one_stack_at_a_time():
    model = tiny_model()
    data = rng_stack((2, 5, 3, 20, 20), seed=11)  # [P, T, C, H, W]
    y = denoise(data, model, time_axis=1, device=EXACT)
    for p in range(2):
        for c in range(3):
            np.testing.assert_allclose(y[p, :, c], denoise(data[p, :, c], model, device=EXACT), atol=1e-6)


def test_more_than_three_axes_need_the_time_axis():
    with pytest.raises(ValueError, match="time_axis"):
        denoise(rng_stack((2, 4, 16, 16)), tiny_model())
    with pytest.raises(ValueError, match="time_axis=2"):
        denoise(rng_stack((2, 4, 16, 16)), tiny_model(), time_axis=2)


# ----------------------------------------------------------------------------- progress and cancel
def test_progress_is_reported_after_every_batch():
    calls = []
    plan = TilePlan.create((9, 40, 40), (4, 16, 16), (1, 4, 4), "auto")
    denoise(rng_stack((2, 9, 40, 40)), tiny_model(), time_axis=1, tile=(4, 16, 16), overlap=(1, 4, 4),
            batch_size=5, device=EXACT, progress=lambda done, total: calls.append((done, total)))
    total = 2 * len(plan)
    assert len(calls) == 2 * math.ceil(len(plan) / 5)
    assert [t for _, t in calls] == [total] * len(calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1][0] == total


def test_cancel_stops_between_batches_and_leaves_the_input_alone():
    image = rng_stack((9, 40, 40))
    before = image.copy()
    stop = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        stop.set()

    with pytest.raises(Cancelled):
        denoise(image, tiny_model(), tile=(4, 16, 16), batch_size=2, device=EXACT, progress=progress, stop=stop)
    assert calls == [2]
    np.testing.assert_array_equal(image, before)


def test_cancel_before_the_start_runs_nothing():
    out = np.full((4, 16, 16), -1, dtype=np.float32)
    with pytest.raises(Cancelled):
        denoise(rng_stack((4, 16, 16)), tiny_model(), out=out, stop=lambda: True, device=EXACT)
    assert (out == -1).all()


def test_the_former_name_of_stop_still_works_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"denoise\(cancel=...\) is now denoise\(stop=...\)"):
        with pytest.raises(Cancelled):
            denoise(rng_stack((4, 16, 16)), tiny_model(), cancel=lambda: True, device=EXACT)
    with pytest.raises(TypeError, match="both stop= and its former name cancel="):
        denoise(rng_stack((4, 16, 16)), tiny_model(), stop=lambda: True, cancel=lambda: True, device=EXACT)
    with pytest.raises(TypeError, match="stop must be a threading.Event"):
        denoise(rng_stack((4, 16, 16)), tiny_model(), stop="yes", device=EXACT)


# ----------------------------------------------------------------------------- automatic sizes
def test_automatic_tile_and_batch_follow_the_device_memory(monkeypatch):
    config = napari_cnnt.PRESETS["small"]
    cpu = Runtime.create("cpu", fast=False)
    monkeypatch.setattr(inference, "_free_memory", lambda device: 64 << 30)
    assert inference.auto_tile(config, (32, 512, 512), cpu) == (18, 128, 128)  # two time windows, not three
    assert inference.auto_tile(config, (5, 40, 70), cpu) == (5, 40, 72)
    assert inference.auto_batch_size(config, (16, 64, 64), cpu) == 4
    assert inference.auto_batch_size(config, (16, 128, 128), cpu) == 1  # larger calls outgrow the cache
    budget = 300 << 20
    monkeypatch.setattr(inference, "_free_memory", lambda device: 2 * budget)
    t, h, w = inference.auto_tile(config, (32, 512, 512), cpu)
    assert t == 18 and h == w and h % config.size_multiple == 0
    assert inference._tile_bytes(config, (t, h, w)) <= budget < inference._tile_bytes(config, (t, 2 * h, 2 * w))
    monkeypatch.setattr(inference, "_free_memory", lambda device: 1 << 20)
    assert inference.auto_batch_size(config, (t, h, w), cpu) == 1


# The bundled model's architecture and patch; bounds on the voxel-frames computed per
# output voxel-frame, against the training patch with a quarter overlap (2.34, 1.89, 2.21).
@pytest.mark.parametrize("shape,bound", [
    ((32, 256, 256), 1.76), ((16, 512, 512), 1.90), ((100, 1024, 1024), 2.07), ((64, 256, 256), 1.86),
])
def test_automatic_tiles_bound_the_redundant_compute(monkeypatch, shape, bound):
    monkeypatch.setattr(inference, "_free_memory", lambda device: 16 << 30)
    config = napari_cnnt.PRESETS["small"].replace(height=64, width=64)
    tile, overlap = inference.auto_layout(config, shape, Runtime.create("cpu", fast=False))
    plan = TilePlan.create(shape, tile, overlap)
    old = TilePlan.create(shape, (16, 64, 64), (4, 16, 16))
    assert plan.redundancy <= bound
    assert plan.redundancy <= old.redundancy
    assert tile[1:] == (64, 64) and overlap == (4, 16, 16)  # the training patch keeps its accuracy
    assert 16 <= tile[0] <= 20


def test_redundancy_counts_every_computed_voxel_frame():
    assert TilePlan.create((16, 64, 64), (16, 64, 64), (4, 16, 16)).redundancy == 1.0
    plan = TilePlan.create((32, 256, 256), (16, 64, 64), (4, 16, 16))
    assert len(plan) == 75 and plan.redundancy == pytest.approx(75 * 16 * 64 * 64 / (32 * 256 * 256))
    assert TilePlan.create((5, 40, 70), (5, 40, 72), (1, 10, 18)).redundancy == pytest.approx(72 / 70)
    assert "2.34 voxel-frames" in plan.describe()


def test_denoise_logs_its_tiles(caplog):
    with caplog.at_level(logging.DEBUG, logger="napari_cnnt.inference"):
        denoise(rng_stack((6, 16, 16)), tiny_model(), tile=(4, 16, 16), overlap=(2, 0, 0), device=EXACT)
    assert "2 tiles of [4, 16, 16]" in caplog.text and "1.33 voxel-frames" in caplog.text


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs,match", [
    ({"tile": (4, 15, 16)}, "not a multiple of 2"),
    ({"tile": (4, 16, 16), "overlap": (1, 16, 4)}, "overlap"),
    ({"layout": "fancy"}, "layout"),
    ({"batch_size": 0}, "batch_size"),
    ({"tile": (4, 16)}, "three integers"),
    ({"normalization": "sometimes"}, "normalization"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        denoise(rng_stack((4, 20, 20)), tiny_model(), device=EXACT, **kwargs)


@pytest.mark.parametrize("data,match", [
    (np.zeros(10, np.float32), "at least 2-D"),
    (np.zeros((0, 4, 4), np.float32), "empty"),
    (np.zeros((2, 4, 4), np.complex64), "real numbers"),
])
def test_bad_data_is_named(data, match):
    with pytest.raises((ValueError, TypeError), match=match):
        denoise(data, tiny_model(), device=EXACT)


def test_denoise_is_exported_lazily():
    assert napari_cnnt.denoise is denoise
    assert napari_cnnt.Cancelled is Cancelled
