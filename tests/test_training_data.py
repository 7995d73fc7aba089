import h5py
import numpy as np
import pytest

from napari_cnnt.normalization import Normalization
from napari_cnnt.training.data import (
    PatchSampler,
    Sample,
    epoch_schedule,
    make_samples,
    patch_sizes_of,
    samples_from_h5,
    samples_from_pairs,
    split_samples,
    steps_per_epoch,
)

NONE = Normalization.none()


def _sample(shape=(4, 8, 8), name="s", value=None):
    rng = np.random.default_rng(0)
    clean = rng.random(shape, dtype=np.float32) if value is None else np.full(shape, value, np.float32)
    return Sample(name, clean + 1.0, clean)


def test_fixed_normalisation_is_affine_unclipped_and_leaves_input_alone():
    noisy = np.array([[[0, 100, 200, 400]]], np.uint16)
    clean = noisy.copy()
    (s,) = make_samples("p", noisy, clean, Normalization("fixed", 100, 300))
    np.testing.assert_allclose(s.noisy[0, 0], [-0.5, 0, 0.5, 1.5])
    assert s.noisy.dtype == np.float32
    assert noisy.tolist() == [[[0, 100, 200, 400]]]


def test_percentile_normalisation_scales_clean_with_the_noisy_limits():
    """As denoising does: intensities keep their relation, so a model learns no intensity change."""
    rng = np.random.default_rng(0)
    clean = rng.random((2, 16, 16)) * 1000 + 100
    noisy = clean + rng.normal(0, 50, clean.shape)
    (s,) = make_samples("p", noisy, clean, Normalization("percentile", 1.5, 99.5))
    lo, hi = np.percentile(noisy, [1.5, 99.5])
    np.testing.assert_allclose(s.noisy, (noisy - lo) / (hi - lo), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s.clean, (clean - lo) / (hi - lo), rtol=1e-5, atol=1e-5)
    assert s.noisy.min() < 0 and s.noisy.max() > 1  # not clipped: denoising does not clip either


def test_two_dimensional_pairs_become_one_frame():
    (s,) = samples_from_pairs([(np.ones((5, 6)), np.ones((5, 6)))], NONE)
    assert s.shape == (1, 5, 6)


@pytest.mark.parametrize(
    "noisy, clean, message",
    [
        (np.zeros((2, 8, 8)), np.zeros((2, 8, 9)), "same shape"),
        (np.full((2, 8, 8), np.nan), np.zeros((2, 8, 8)), "NaN"),
        (np.zeros((2, 8, 8)), np.full((2, 8, 8), np.inf), "NaN or infinite"),
        (np.zeros((0, 8, 8)), np.zeros((0, 8, 8)), "empty"),
        (np.zeros((2, 2, 8, 8)), np.zeros((2, 2, 8, 8)), r"\[T, H, W\]"),
        (np.array([["a"]]), np.array([["b"]]), "numeric"),
    ],
)
def test_bad_pairs_are_refused_by_name(noisy, clean, message):
    with pytest.raises(ValueError, match=message) as e:
        samples_from_pairs([(noisy, clean)], NONE)
    assert "pair 0" in str(e.value)


def test_pairs_must_be_a_list_of_tuples():
    a = np.zeros((2, 8, 8))
    with pytest.raises(ValueError, match="list of"):
        samples_from_pairs((a, a), NONE)
    with pytest.raises(ValueError, match="no training pairs"):
        samples_from_pairs([], NONE)


def test_regions_of_interest_become_samples():
    noisy = np.arange(2 * 10 * 12, dtype=np.float32).reshape(2, 10, 12)
    samples = samples_from_pairs([(noisy, noisy, [(0, 0, 4, 5), (2, 3, 10, 12)])], NONE)
    assert [s.name for s in samples] == ["pair 0 roi 0", "pair 0 roi 1"]
    np.testing.assert_array_equal(samples[1].noisy, noisy[:, 2:10, 3:12])
    (single,) = samples_from_pairs([(noisy, noisy, (1, 1, 3, 3))], NONE)
    assert single.shape == (2, 2, 2)
    # A region is scaled as it will be when the whole stack is denoised.
    pct = Normalization("percentile", 1.5, 99.5)
    (whole,) = samples_from_pairs([(noisy, noisy)], pct)
    (region,) = samples_from_pairs([(noisy, noisy, (2, 3, 10, 12))], pct)
    np.testing.assert_array_equal(region.noisy, whole.noisy[:, 2:10, 3:12])
    with pytest.raises(ValueError, match="outside"):
        samples_from_pairs([(noisy, noisy, (0, 0, 11, 4))], NONE)
    with pytest.raises(ValueError, match="empty"):
        samples_from_pairs([(noisy, noisy, [])], NONE)


def test_hdf5_samples_and_missing_keys(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        for k in ("a", "b"):
            f[f"{k}/noisy_im"] = np.full((3, 8, 8), 2.0)
            f[f"{k}/clean_im"] = np.full((3, 8, 8), 1.0)
    samples = samples_from_h5(path, Normalization("fixed", 0, 4))
    assert [s.name for s in samples] == ["data.h5:a", "data.h5:b"]
    assert samples[0].noisy.max() == 0.5
    with pytest.raises(ValueError, match="no sample group"):
        samples_from_h5(path, NONE, keys=["c"])
    with h5py.File(path, "a") as f:
        f["c/noisy_im"] = np.zeros((3, 8, 8))
    with pytest.raises(ValueError, match="'c' has no 'clean_im'"):
        samples_from_h5(path, NONE)
    with pytest.raises(ValueError, match="no such file"):
        samples_from_h5(tmp_path / "missing.h5", NONE)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        samples_from_h5(tmp_path / "text.h5", NONE)


def test_short_and_small_stacks_are_padded_symmetrically():
    clean = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) + 1
    sampler = PatchSampler([Sample("s", clean, clean)], time=5, height=6, width=6)
    # Without flips the only cut-out of a padded stack is the padded stack itself.
    noisy, target = sampler.draw(0, np.random.default_rng(0), flip=False)
    expected = np.pad(clean, ((0, 3), (0, 3), (0, 3)), mode="symmetric")
    np.testing.assert_array_equal(target, expected)
    np.testing.assert_array_equal(noisy, expected)


def test_flips_happen_in_height_and_width_and_keep_pairs_aligned():
    clean = np.arange(4 * 4, dtype=np.float32).reshape(1, 4, 4) + 1
    sampler = PatchSampler([Sample("s", clean + 100, clean)], time=1, height=4, width=4)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        noisy, target = sampler.draw(0, rng)
        np.testing.assert_array_equal(noisy, target + 100)
        seen.add(target.tobytes())
    variants = {clean[:, ::a, ::b].tobytes() for a in (1, -1) for b in (1, -1)}
    assert seen == variants


def test_patches_are_cut_at_random_positions_and_times():
    stack = np.arange(6 * 10 * 10, dtype=np.float32).reshape(6, 10, 10)
    sampler = PatchSampler([Sample("s", stack, stack)], time=2, height=4, width=4, area_thres=0)
    rng = np.random.default_rng(1)
    corners = {sampler.draw(0, rng, flip=False)[1][0, 0, 0] for _ in range(200)}
    assert len(corners) > 50
    assert all(c % 100 <= 66 for c in corners)  # every window fits inside the stack


def test_foreground_selection_prefers_patches_with_signal():
    # A bright corner: a random 16 x 16 patch of this 40 x 40 image has 25 %
    # foreground with probability 0.19; the best of ten draws with 0.87.
    clean = np.zeros((1, 40, 40), np.float32)
    clean[:, :16, :16] = 1.0
    sampler = PatchSampler([Sample("s", clean, clean)], time=1, height=16, width=16)
    rng = np.random.default_rng(0)
    fractions = [np.mean(sampler.draw(0, rng, flip=False)[1] > 0.002) for _ in range(100)]
    plain_rng = np.random.default_rng(0)
    plain = PatchSampler([Sample("s", clean, clean)], time=1, height=16, width=16, area_thres=0)
    baseline = [np.mean(plain.draw(0, plain_rng, flip=False)[1] > 0.002) for _ in range(100)]
    assert np.mean(np.array(fractions) >= 0.25) > 0.75
    assert np.mean(np.array(baseline) >= 0.25) < 0.3


def test_fixed_patches_are_repeatable_and_unflipped():
    s = _sample((4, 20, 20))
    sampler = PatchSampler([s, s], time=2, height=8, width=8)
    a = sampler.fixed_patches(3, seed=5)
    b = sampler.fixed_patches(3, seed=5)
    assert a[0].shape == (6, 2, 1, 8, 8)
    np.testing.assert_array_equal(a[1], b[1])


def test_epoch_schedule_interleaves_sizes_and_covers_samples():
    rng = np.random.default_rng(0)
    schedule = epoch_schedule(n_samples=10, n_sizes=2, batch_size=4, patches_per_sample=2, rng=rng)
    assert len(schedule) == steps_per_epoch(10, 2, 4, 2) == 10
    sizes = [k for k, _ in schedule]
    assert sizes.count(0) == sizes.count(1) == 5
    assert sizes != sorted(sizes)
    for k in (0, 1):
        items = np.concatenate([b for s, b in schedule if s == k])
        assert len(items) == 20 and set(items) == set(range(10))
    # Fewer patches than one batch: samples repeat to fill it.
    (only,) = epoch_schedule(3, 1, 8, 1, rng)
    assert len(only[1]) == 8 and set(only[1]) == {0, 1, 2}


def test_patch_sizes_and_split():
    assert patch_sizes_of(16) == [(16, 16)]
    assert patch_sizes_of([16, (8, 32)]) == [(16, 16), (8, 32)]
    for bad in ([], [0], ["x"], [(1, 2, 3)]):
        with pytest.raises(ValueError):
            patch_sizes_of(bad)
    samples = [_sample(name=f"s{i}") for i in range(10)]
    train, val, split = split_samples(samples, None)
    assert [s.name for s in val] == ["s8", "s9"] and len(train) == 8
    assert "last 2" in str(split)
    train, val, split = split_samples(samples[:1], None)
    assert train == val and "optimistic" in str(split)


def test_augmentations_keep_patches_a_recording_could_have_made():
    """Flips, quarter turns and time reversal of the whole sample: all 16 variants occur, nothing else."""
    stack = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6)
    sampler = PatchSampler([Sample("s", stack, stack + 1)], time=4, height=6, width=6, area_thres=0,
                           augment=("flip", "rot90", "time_reverse"))
    variants = set()
    for k in range(4):
        for flip in (False, True):
            for reverse in (False, True):
                v = np.rot90(stack[:, ::-1] if flip else stack, k, axes=(1, 2))
                variants.add((v[::-1] if reverse else v).tobytes())
    assert len(variants) == 16
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        noisy, clean = sampler.draw(0, rng)
        np.testing.assert_array_equal(clean, noisy + 1)  # the same change to both images
        assert noisy.tobytes() in variants
        seen.add(noisy.tobytes())
    assert seen == variants
    # Validation patches are never changed; rectangular patches are not turned.
    x, _ = sampler.fixed_patches(3, seed=0)
    assert all(np.array_equal(p[:, 0], stack) for p in x)
    wide = PatchSampler([Sample("s", stack, stack)], 4, 4, 6, area_thres=0, augment=("rot90",))
    assert all(wide.draw(0, rng)[0].shape == (4, 4, 6) for _ in range(20))
    with pytest.raises(ValueError, match="unknown augmentation"):
        PatchSampler([Sample("s", stack, stack)], 4, 4, 4, augment=("shear",))


def test_a_budget_of_steps_deals_the_samples_evenly():
    from napari_cnnt.training.data import budget_schedule

    schedule = budget_schedule(5, 2, 4, 10, np.random.default_rng(0))
    assert len(schedule) == 10 and all(len(idx) == 4 for _, idx in schedule)
    counts = np.bincount(np.concatenate([idx for _, idx in schedule]), minlength=5)
    assert counts.tolist() == [8] * 5
    assert {k for k, _ in schedule} == {0, 1}


def test_few_pairs_hold_out_a_part_of_each():
    from napari_cnnt.training.data import split_samples

    wide, tall, short = _sample((8, 40, 96), "wide"), _sample((8, 96, 40), "tall"), _sample((20, 12, 12), "short")
    train, val, split = split_samples([wide, tall, short], None)
    assert [s.shape for s in train] == [(8, 40, 72), (8, 72, 40), (15, 12, 12)]
    assert [s.shape for s in val] == [(8, 40, 24), (8, 24, 40), (5, 12, 12)]
    assert split.val == ["wide columns 72-95", "tall rows 72-95", "short frames 15-19"]
    np.testing.assert_array_equal(val[0].noisy, wide.noisy[:, :, 72:])
    tiny = _sample((2, 8, 8), "tiny")
    train, val, split = split_samples([tiny], None)
    assert train == val == [tiny] and "too small to be cut also validate whole" in str(split)
    many = [_sample(name=f"s{i}") for i in range(5)]
    train, val, split = split_samples(many, None)
    assert [s.name for s in val] == ["s4"] and len(train) == 4
    train, val, _ = split_samples(many, "regions")
    assert len(train) == len(val) == 5
