"""The synthetic time-lapse: deterministic, fast, and noisy the way a camera is."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_cnnt.synthetic import STRUCTURES, simulate


def test_same_seed_same_stacks_other_seed_other_stacks():
    noisy, clean = simulate((4, 48, 40), seed=3)
    again = simulate((4, 48, 40), seed=3)
    np.testing.assert_array_equal(noisy, again[0])
    np.testing.assert_array_equal(clean, again[1])
    assert not np.array_equal(noisy, simulate((4, 48, 40), seed=4)[0])
    assert noisy.shape == clean.shape == (4, 48, 40)
    assert noisy.dtype == np.uint16 and clean.dtype == np.float32


def test_sample_size_generates_in_well_under_a_second():
    simulate((32, 256, 256), seed=0)  # warm caches (FFT plans, imports)
    elapsed = min(_timed(simulate, (32, 256, 256), seed=0) for _ in range(2))
    assert elapsed < 1.0, f"{elapsed:.2f} s"


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def test_camera_noise_follows_the_poisson_gaussian_model():
    """On a uniform field: mean = gain*QE*photons + offset,
    variance = gain**2 * (QE*photons + read_noise**2) (+ 1/12 from rounding)."""
    gain, qe, photons, read_noise, offset = 2.0, 0.8, 20.0, 1.6, 100.0
    noisy, clean = simulate((8, 64, 64), structures=(), background_photons=photons, gain=gain, qe=qe,
                            read_noise=read_noise, offset=offset, seed=1)
    np.testing.assert_allclose(clean, gain * qe * photons + offset)
    values = noisy.astype(np.float64)
    assert values.mean() == pytest.approx(gain * qe * photons + offset, rel=2e-3)
    assert values.var() == pytest.approx(gain**2 * (qe * photons + read_noise**2) + 1 / 12, rel=0.03)


def test_structures_bleaching_and_clipping():
    offset, background = 100.0, 3.0
    base = 2.0 * 0.8 * background + offset
    _, clean = simulate((12, 96, 96), peak_photons=50, background_photons=background, seed=2)
    signal = clean - base
    assert signal[0].max() == pytest.approx(2.0 * 0.8 * 50, rel=1e-4)  # peak_photons at the brightest pixel
    assert signal[-1].sum() < signal[0].sum() * np.exp(-0.01 * 11) * 1.02  # bleached
    assert (signal > 5).mean() > 0.02  # structures cover part of the field

    per_type = {name: simulate((2, 64, 64), structures=(name,), seed=5)[1] for name in STRUCTURES}
    assert all(c.max() > c.min() + 10 for c in per_type.values())
    nucleus_area = (per_type["nucleus"][0] - per_type["nucleus"][0].min() > 20).mean()
    puncta_area = (per_type["puncta"][0] - per_type["puncta"][0].min() > 20).mean()
    assert nucleus_area > 3 * puncta_area  # one big object vs. small spots

    noisy, _ = simulate((2, 32, 32), peak_photons=1e5, bit_depth=12, seed=0)
    assert noisy.max() == 4095


def test_unknown_structure_is_refused():
    with pytest.raises(ValueError, match="unknown structure"):
        simulate((2, 32, 32), structures=("membranes",))
