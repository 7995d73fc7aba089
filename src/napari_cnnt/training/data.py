"""Training data: where pairs come from, and how patches are cut from them.

A :class:`Sample` is one noisy/clean pair, or a noisy stack alone (for the
self-supervised objectives of :mod:`~napari_cnnt.training.interlace` and
:mod:`~napari_cnnt.training.blindspot`),
normalised to [0, 1] and held in memory as float32 ``[T, H, W]``. Samples
come from in-memory arrays
(:func:`samples_from_pairs`) or from CNNT HDF5 files (:func:`samples_from_h5`,
one group per sample holding ``noisy_im`` and ``clean_im``).

A :class:`PatchSampler` cuts ``time x height x width`` patches following the
reference recipe (``docs/cnnt.md`` section 7): symmetric padding of
stacks that are too short or too small, random flips in H and W, a random
cut-out, and up to ten draws to find one whose target shows enough signal.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io.hdf5 import open_training_pairs
from ..normalization import Normalization

# Foreground test of the reference: a patch is kept if at least AREA_THRES of
# its target pixels are brighter than VALUE_THRES (on the [0, 1] scale).
VALUE_THRES = 0.002
AREA_THRES = 0.25
MAX_DRAWS = 10


@dataclass(frozen=True)
class Sample:
    """One training pair: float32 ``[T, H, W]`` arrays on the model's [0, 1] scale.

    ``clean`` is None for a noisy stack without truth, which trains and
    validates with a self-supervised objective (``TrainSettings.objective``).
    """

    name: str
    noisy: np.ndarray = field(repr=False)
    clean: np.ndarray | None = field(default=None, repr=False)
    # Without truth, the interlaced objective's target (interlace.between_frames), set by the trainer.
    between: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.noisy.shape)

    @property
    def has_truth(self) -> bool:
        return self.clean is not None

    @property
    def target(self) -> np.ndarray:
        """What the network's output is compared with: the clean image or, without it, the
        interlaced objective's target or the noisy image itself (the blind spot's)."""
        if self.clean is not None:
            return self.clean
        return self.noisy if self.between is None else self.between


# ----------------------------------------------------------------------------- sources
def _as_stack(name: str, what: str, array: Any) -> np.ndarray:
    """A ``[T, H, W]`` view of a ``[T, H, W]`` or ``[H, W]`` numeric array, checked."""
    a = np.asarray(array)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name}: {what} image must be numeric, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name}: {what} image must be [T, H, W] or [H, W], got shape {list(a.shape)}")
    if a.size == 0:
        raise ValueError(f"{name}: {what} image is empty (shape {list(a.shape)})")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name}: {what} image contains NaN or infinite values")
    return a


def _normalise(a: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    lo, hi = limits
    return (a.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)


def make_samples(
    name: str,
    noisy: Any,
    clean: Any,
    normalization: Normalization,
    rois: Sequence[tuple[int, int, int, int]] | None = None,
) -> list[Sample]:
    """Check and normalise one pair (``clean`` None: a noisy stack alone): one sample, or one per
    ``(top, left, bottom, right)`` box in ``rois``.

    Both images are scaled with the limits of the whole noisy stack, unclipped:
    exactly what denoising does to its input and undoes on its output, so a
    trained model keeps intensities in the camera's units, and a region is
    scaled as it will be when the whole image is denoised. (The reference
    scales the clean image by its own percentiles and clips both to [0, 1],
    which teaches a model to change intensities.) The inputs are never modified.
    """
    n = _as_stack(name, "noisy", noisy)
    c = None if clean is None else _as_stack(name, "clean", clean)
    if c is not None and n.shape != c.shape:
        raise ValueError(
            f"{name}: noisy and clean images must have the same shape, got {list(n.shape)} and {list(c.shape)}"
        )
    limits = normalization.limits(n)

    def scaled(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else _normalise(a, limits)

    if rois is None:
        return [Sample(name, scaled(n), scaled(c))]
    samples = []
    for j, roi in enumerate(rois):
        top, left, bottom, right = _check_roi(name, roi, n.shape[1:])
        box = (slice(None), slice(top, bottom), slice(left, right))
        samples.append(Sample(f"{name} roi {j}", scaled(n[box]), scaled(None if c is None else c[box])))
    return samples


def _check_roi(name: str, roi: Any, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    try:
        top, left, bottom, right = (int(v) for v in roi)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: a region of interest is (top, left, bottom, right), got {roi!r}") from None
    H, W = hw
    if not (0 <= top < bottom <= H and 0 <= left < right <= W):
        raise ValueError(
            f"{name}: region of interest {(top, left, bottom, right)} is empty or outside the {H} x {W} image"
        )
    return top, left, bottom, right


def samples_from_pairs(pairs: Iterable[Any], normalization: Normalization, prefix: str = "pair") -> list[Sample]:
    """Samples from ``(noisy, clean)`` or ``(noisy, clean, rois)`` tuples, or noisy stacks alone:
    bare arrays or ``(noisy, None)``.

    ``rois`` is one ``(top, left, bottom, right)`` box or a list of them; each
    box becomes a sample of its own.
    """
    if isinstance(pairs, np.ndarray) or (isinstance(pairs, tuple) and len(pairs) in (2, 3)
                                         and all(isinstance(p, np.ndarray) for p in pairs[:2])):
        raise ValueError("pairs must be a list of (noisy, clean) tuples or noisy arrays, e.g. [(noisy, clean)] "
                         "or [noisy]")
    samples = []
    for i, pair in enumerate(pairs):
        name = f"{prefix} {i}"
        if isinstance(pair, np.ndarray) or hasattr(pair, "__array__"):
            pair = (pair, None)
        if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 3):
            raise ValueError(f"{name}: expected (noisy, clean), (noisy, clean, rois) or a noisy array, "
                             f"got {type(pair).__name__}")
        rois = pair[2] if len(pair) == 3 else None
        if rois is not None:
            rois = [rois] if len(rois) == 4 and all(np.isscalar(v) for v in rois) else list(rois)
            if not rois:
                raise ValueError(f"{name}: the list of regions of interest is empty")
        samples += make_samples(name, pair[0], pair[1], normalization, rois)
    if not samples:
        raise ValueError("no training pairs were given")
    return samples


def h5_keys(path: str | os.PathLike) -> list[str]:
    """The sample groups of a CNNT HDF5 file, in the order the reference reads them."""
    with open_training_pairs(path) as pairs:
        return [name for name, _, _ in pairs]


def samples_from_h5(
    path: str | os.PathLike, normalization: Normalization, keys: Sequence[str] | None = None
) -> list[Sample]:
    """Read the groups ``keys`` (default: all) of a CNNT HDF5 file into memory, normalised."""
    with open_training_pairs(path) as pairs:
        by_name = {name: (noisy, clean) for name, noisy, clean in pairs}
        keys = list(by_name) if keys is None else list(keys)
        missing = [k for k in keys if k not in by_name]
        if missing:
            raise ValueError(f"{path}: no sample group(s) {', '.join(map(repr, missing))} in the file")
        name = Path(path).name
        return [
            s for k in keys for s in make_samples(f"{name}:{k}", by_name[k][0][()], by_name[k][1][()], normalization)
        ]


# ----------------------------------------------------------------------------- split
@dataclass
class Split:
    """Which samples train and which validate, with anything worth a warning."""

    train: list[str]
    val: list[str]
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"training on {len(self.train)} sample(s): {_names(self.train)}",
            f"validating on {len(self.val)} sample(s): {_names(self.val)}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def to_dict(self) -> dict[str, Any]:
        return {"train": list(self.train), "val": list(self.val), "notes": list(self.notes)}


def _names(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "-"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# With this few samples, a part of each one validates rather than whole samples.
FEW_SAMPLES = 3
# A region held out for validation is the last quarter of an axis, of at least
# MIN_PART pixels or frames, and leaves at least as much for training.
MIN_PART = {"width": 16, "height": 16, "frames": 4}


def held_out_count(n: int) -> int:
    """How many of ``n`` samples validate when none are given: 0 (a part of each, see
    :func:`split_regions`) for up to :data:`FEW_SAMPLES`, else the last fifth."""
    return max(1, round(n / 5)) if n > FEW_SAMPLES else 0


def hold_out_part(sample: Sample) -> tuple[Sample, Sample] | None:
    """``sample`` cut in two along its widest axis: ``(train part, validation part)``.

    The validation part is the last quarter of the width or the height
    (whichever is longer), or of the frames when both are too small; None
    when the sample is too small to be cut.
    """
    t, h, w = sample.shape
    for axis, name in sorted(((2, "width"), (1, "height")), key=lambda a: -sample.shape[a[0]]) + [(0, "frames")]:
        size = sample.shape[axis]
        cut = size - max(size // 4, MIN_PART[name])
        if cut < MIN_PART[name]:
            continue
        head = [slice(None)] * 3
        tail = [slice(None)] * 3
        head[axis], tail[axis] = slice(0, cut), slice(cut, size)
        part = "columns" if name == "width" else "rows" if name == "height" else "frames"
        def cut_out(window: list[slice]) -> tuple[np.ndarray, np.ndarray | None]:
            return sample.noisy[tuple(window)], None if sample.clean is None else sample.clean[tuple(window)]

        return (
            Sample(f"{sample.name} {part} 0-{cut - 1}", *cut_out(head)),
            Sample(f"{sample.name} {part} {cut}-{size - 1}", *cut_out(tail)),
        )
    return None


def split_regions(samples: list[Sample]) -> tuple[list[Sample], list[Sample], list[str]]:
    """Hold out a part of every sample (see :func:`hold_out_part`); samples too small to be cut
    train and validate whole."""
    train, val, whole = [], [], []
    for s in samples:
        parts = hold_out_part(s)
        if parts is None:
            train.append(s)
            val.append(s)
            whole.append(s.name)
        else:
            train.append(parts[0])
            val.append(parts[1])
    notes = ["the last quarter of each sample's width, height or frames validates, the rest trains"]
    if whole:
        notes.append(f"{len(whole)} sample(s) too small to be cut also validate whole, so the validation score "
                     f"is optimistic: {_names(whole)}")
    return train, val, notes


def split_samples(
    train: list[Sample], val: list[Sample] | str | None
) -> tuple[list[Sample], list[Sample], Split]:
    """Hold out validation data when none are given.

    With up to :data:`FEW_SAMPLES` samples, or ``val="regions"``, a part of
    every sample validates (:func:`split_regions`), so that every sample
    also trains; with more, the last fifth of the samples validates.
    """
    notes = []
    if val == "regions" or (val is None and len(train) <= FEW_SAMPLES):
        train, val, notes = split_regions(train)
    elif isinstance(val, str):
        raise ValueError(f"validation data must be pairs, a file, [] or 'regions', got {val!r}")
    elif val is None:
        n_val = held_out_count(len(train))
        train, val = train[:-n_val], train[-n_val:]
        notes.append(f"no validation data given: the last {n_val} of the training samples validate")
    elif not val:
        notes.append("no validation: the weights of the last epoch are kept")
    else:
        overlap = sorted({s.name for s in train} & {s.name for s in val})
        if overlap:
            notes.append(f"{len(overlap)} sample(s) both train and validate: {_names(overlap)}")
    return train, val, Split([s.name for s in train], [s.name for s in val], notes)


def split_h5_files(
    files: Sequence[str | os.PathLike], ratio: Sequence[int] = (90, 5, 5), fine_samples: int = -1, seed: int = 0
) -> tuple[dict[str, list[tuple[Path, str]]], list[str]]:
    """The reference's train/validation/test split of HDF5 files, as ``(path, key)`` lists.

    With ``fine_samples > 0`` (fine-tuning; one file only) the first
    ``fine_samples`` samples train and the last five validate and test.
    Otherwise each file's samples are shuffled and cut by ``ratio``
    (percentages); an empty test part takes the last sample and an empty
    validation part the test samples. The reference shuffles without a seed;
    here ``seed`` makes the split repeatable. Also returns notes on overlaps.
    """
    ratio = [int(r) for r in ratio]
    if len(ratio) != 3 or min(ratio) < 0 or sum(ratio) > 100 or ratio[0] == 0:
        raise ValueError(
            f"ratio must be three percentages (train, validation, test) summing to at most 100 "
            f"with some training data, got {ratio}"
        )
    if not files:
        raise ValueError("no HDF5 training files were given")
    parts: dict[str, list[tuple[Path, str]]] = {"train": [], "val": [], "test": []}
    if fine_samples > 0:
        if len(files) != 1:
            raise ValueError(f"fine-tuning (fine_samples > 0) takes exactly one training file, got {len(files)}")
        path = Path(files[0])
        keys = h5_keys(path)
        parts["train"] = [(path, k) for k in keys[:fine_samples]]
        parts["val"] = parts["test"] = [(path, k) for k in keys[-5:]]
    else:
        rng = np.random.default_rng(seed)
        r = [x / 100 for x in ratio]
        for f in files:
            path = Path(f)
            keys = h5_keys(path)
            keys = [keys[i] for i in rng.permutation(len(keys))]
            n = len(keys)
            a, b, c = int(r[0] * n), int((r[0] + r[1]) * n), int((r[0] + r[1] + r[2]) * n)
            test = keys[b:c] or keys[-1:]
            val = keys[a:b] or test
            parts["train"] += [(path, k) for k in keys[:a]]
            parts["val"] += [(path, k) for k in val]
            parts["test"] += [(path, k) for k in test]
    if not parts["train"]:
        raise ValueError(f"the split leaves no training samples (ratio {ratio}); use more data or a larger ratio")
    notes = []
    shared = set(parts["train"]) & set(parts["val"])
    if shared:
        notes.append(f"{len(shared)} validation sample(s) also train, so the validation loss is optimistic")
    return parts, notes


def samples_from_keys(
    keys: Sequence[tuple[str | os.PathLike, str]], normalization: Normalization
) -> list[Sample]:
    """Samples for ``(path, key)`` pairs, reading each file once, in the order given."""
    by_file: dict[Path, list[str]] = {}
    for path, key in keys:
        by_file.setdefault(Path(path), []).append(key)
    loaded = {}
    for path, ks in by_file.items():
        loaded.update(zip([(path, k) for k in ks], samples_from_h5(path, normalization, ks)))
    return [loaded[(Path(p), k)] for p, k in keys]


# ----------------------------------------------------------------------------- patches
def _pad_end(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    if a.shape[axis] >= size:
        return a
    width = [(0, 0)] * a.ndim
    width[axis] = (0, size - a.shape[axis])
    return np.pad(a, width, mode="symmetric")


AUGMENTATIONS = ("flip", "rot90", "time_reverse")
"""Random changes to training patches that a microscope could have recorded as well: mirror
images in H and W (``flip``, the reference's), quarter turns of square patches (``rot90``)
and the frames played backwards (``time_reverse``). Noise statistics are unchanged by all three."""


class PatchSampler:
    """Cuts ``[time, height, width]`` patches out of samples, the reference's way.

    Stacks with fewer than ``time`` frames are padded symmetrically at the
    end, then changed at random by ``augment`` (a subset of
    :data:`AUGMENTATIONS`; the reference flips in H and W), padded in H and W
    when smaller than the patch, and cut at a random position. Up to ten
    draws keep the first whose target has ``area_thres`` of its pixels above
    ``value_thres``, otherwise the draw with the most such pixels.
    Large stacks are never copied: flips and cut-outs are views.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        time: int,
        height: int,
        width: int,
        value_thres: float = VALUE_THRES,
        area_thres: float = AREA_THRES,
        augment: Sequence[str] = ("flip",),
    ):
        if not samples:
            raise ValueError("a patch sampler needs at least one sample")
        if min(time, height, width) < 1:
            raise ValueError(f"patch size must be positive, got {time} x {height} x {width}")
        unknown = sorted(set(augment) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
        self.samples = list(samples)
        self.shape = (int(time), int(height), int(width))
        self.value_thres = float(value_thres)
        self.area_thres = float(area_thres)
        self.augment = tuple(a for a in AUGMENTATIONS if a in augment)

    def draw(self, index: int, rng: np.random.Generator, flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One ``(noisy, target)`` patch of sample ``index``, each ``[time, height, width]``; the
        target is the clean image, or the noisy one for a sample without truth (:attr:`Sample.target`)."""
        best, best_area = None, -1.0
        for _ in range(MAX_DRAWS):
            noisy, clean = self._cut(self.samples[index], rng, flip)
            area = float(np.count_nonzero(clean > self.value_thres)) / clean.size
            if area >= self.area_thres:
                return noisy, clean
            if area > best_area:
                best, best_area = (noisy, clean), area
        return best

    def batch(
        self, indices: Sequence[int], rng: np.random.Generator, flip: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Patches of the given samples as ``[B, time, 1, height, width]`` arrays."""
        pairs = [self.draw(i, rng, flip) for i in indices]
        return np.stack([p[0] for p in pairs])[:, :, None], np.stack([p[1] for p in pairs])[:, :, None]

    def fixed_patches(self, per_sample: int, seed: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The same unflipped patches of every sample on every call, for validation."""
        indices = np.repeat(np.arange(len(self.samples)), per_sample)
        return self.batch(indices, np.random.default_rng(seed), flip=False)

    def _cut(self, s: Sample, rng: np.random.Generator, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        """``flip=False`` (validation) leaves the patch as recorded."""
        t, h, w = self.shape
        noisy, clean = _pad_end(s.noisy, 0, t), _pad_end(s.target, 0, t)
        if flip and "flip" in self.augment:  # drawn first, so the reference's draws are unchanged
            flip_h, flip_w = rng.integers(0, 2) > 0, rng.integers(0, 2) > 0
            if flip_h:
                noisy, clean = noisy[:, ::-1], clean[:, ::-1]
            if flip_w:
                noisy, clean = noisy[:, :, ::-1], clean[:, :, ::-1]
        for axis, size in ((1, h), (2, w)):
            noisy, clean = _pad_end(noisy, axis, size), _pad_end(clean, axis, size)
        T, H, W = noisy.shape
        st = int(rng.integers(0, T - t + 1))
        sy = int(rng.integers(0, H - h + 1))
        sx = int(rng.integers(0, W - w + 1))
        window = (slice(st, st + t), slice(sy, sy + h), slice(sx, sx + w))
        noisy, clean = noisy[window], clean[window]
        if flip and "time_reverse" in self.augment and rng.integers(0, 2) > 0:
            noisy, clean = noisy[::-1], clean[::-1]
        if flip and "rot90" in self.augment and h == w:
            k = int(rng.integers(0, 4))
            noisy, clean = np.rot90(noisy, k, axes=(1, 2)), np.rot90(clean, k, axes=(1, 2))
        return np.ascontiguousarray(noisy), np.ascontiguousarray(clean)


def epoch_schedule(
    n_samples: int, n_sizes: int, batch_size: int, patches_per_sample: int, rng: np.random.Generator
) -> list[tuple[int, np.ndarray]]:
    """The batches of one epoch as ``(patch size index, sample indices)``, interleaved at random.

    Every patch size sees each sample ``patches_per_sample`` times in a
    random order, in full batches (a remainder is dropped, as the
    reference's loaders do); with fewer patches than one batch, samples
    repeat to fill it.
    """
    n_items = n_samples * patches_per_sample
    n_batches = max(1, n_items // batch_size)
    per_size = []
    for _ in range(n_sizes):
        order = rng.permutation(n_items) // patches_per_sample
        order = np.resize(order, n_batches * batch_size)
        per_size.append(order.reshape(n_batches, batch_size))
    which = rng.permutation(np.repeat(np.arange(n_sizes), n_batches))
    taken = [0] * n_sizes
    schedule = []
    for k in which:
        schedule.append((int(k), per_size[k][taken[k]]))
        taken[k] += 1
    return schedule


def budget_schedule(
    n_samples: int, n_sizes: int, batch_size: int, steps: int, rng: np.random.Generator
) -> list[tuple[int, np.ndarray]]:
    """``steps`` batches of random patches as ``(patch size index, sample indices)``.

    Samples are dealt from shuffled decks, so over an epoch every sample
    gives about as many patches as any other (several per sample when
    ``steps * batch_size`` exceeds the samples), and each step's patch size
    is drawn at random.
    """
    need = steps * batch_size
    decks = [rng.permutation(n_samples) for _ in range(-(-need // n_samples))]
    order = np.concatenate(decks)[:need].reshape(steps, batch_size)
    sizes = rng.integers(0, n_sizes, steps)
    return [(int(k), order[i]) for i, k in enumerate(sizes)]


def steps_per_epoch(n_samples: int, n_sizes: int, batch_size: int, patches_per_sample: int) -> int:
    return n_sizes * max(1, (n_samples * patches_per_sample) // batch_size)


def patch_sizes_of(sizes: Any) -> list[tuple[int, int]]:
    """``128``, ``[128, 160]`` or ``[(128, 96), ...]`` as a list of ``(height, width)``."""
    if isinstance(sizes, (int, np.integer)):
        sizes = [sizes]
    out = []
    for s in sizes:
        if isinstance(s, (int, np.integer)):
            h = w = int(s)
        else:
            try:
                h, w = (int(v) for v in s)
            except (TypeError, ValueError):
                raise ValueError(f"a patch size is an int or (height, width), got {s!r}") from None
        if h < 1 or w < 1:
            raise ValueError(f"patch sizes must be positive, got {h} x {w}")
        out.append((h, w))
    if not out:
        raise ValueError("at least one patch size is needed")
    return out


__all__ = [
    "AUGMENTATIONS",
    "PatchSampler",
    "Sample",
    "Split",
    "budget_schedule",
    "epoch_schedule",
    "hold_out_part",
    "h5_keys",
    "make_samples",
    "patch_sizes_of",
    "samples_from_h5",
    "samples_from_keys",
    "samples_from_pairs",
    "split_h5_files",
    "split_regions",
    "split_samples",
    "steps_per_epoch",
]

