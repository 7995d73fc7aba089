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
        simulate((2, 32, 32), structures=("ribosomes",))


def test_membranes_are_rings():
    _, clean = simulate((2, 128, 128), structures=("membranes",), background_photons=0, psf_sigma=1.0,
                        offset=0, drift=0, seed=2)
    frame = clean[0]
    assert frame.max() > 0
    # an outline: bright pixels are a thin set, and most of the field is dark
    assert (frame > 0.5 * frame.max()).mean() < 0.1


def test_density_scales_the_number_of_objects():
    def lit_fraction(density):
        _, clean = simulate((1, 128, 128), structures=("puncta",), background_photons=0, offset=0,
                            density=density, seed=5)
        return (clean[0] > 0.05 * clean[0].max()).mean()

    assert lit_fraction(3.0) > 2 * lit_fraction(0.3)


def test_blinking_switches_puncta_off_and_on():
    kw = dict(structures=("puncta",), background_photons=0, offset=0, bleach_per_frame=0, seed=1)
    _, steady = simulate((40, 64, 64), **kw)
    _, blinking = simulate((40, 64, 64), blinking=0.3, **kw)
    # total signal per frame varies much more when puncta blink
    def variation(frames):
        totals = frames.sum((1, 2))
        return totals.std() / totals.mean()

    assert variation(blinking) > 3 * variation(steady)


def test_random_recordings_cover_the_conditions():
    from napari_cnnt.synthetic import random_recording

    settings = [random_recording((2, 32, 32), seed)[2] for seed in range(40)]
    photons = [s["peak_photons"] for s in settings]
    assert min(photons) < 20 and max(photons) > 300
    assert all(5 <= p <= 1000 for p in photons)
    assert all(1 <= s["read_noise"] <= 6 for s in settings)
    assert {name for s in settings for name in s["structures"]} == set(STRUCTURES)
    a, b = random_recording((2, 32, 32), 7), random_recording((2, 32, 32), 7)
    np.testing.assert_array_equal(a[0], b[0])
