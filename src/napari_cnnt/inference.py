"""Whole-stack denoising: cut a stack into overlapping tiles, run the network, blend.

For each ``[T, H, W]`` stack: the normalisation limits are computed once over
the whole stack; a :class:`TilePlan` says where the tiles lie; batches of
tiles are read lazily from the input, one time window of frames at a time (on
a GPU, the next batch while the network runs the current one), and
normalised; every prediction is weighted by :func:`ramp` along each axis and
added to a :class:`Blender` that holds one time window of the output; frames
that no later tile touches leave it divided by the summed weights, in the
input's intensity units, and are written to the output.

Extra memory is therefore the output, one time window of the output and of
the input, and the tiles in flight, however long the stack is.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .control import check_progress, renamed, stop_requested
from .errors import DataError
from .normalization import Normalization
from .runtime import Runtime

LAYOUTS = ("auto", "reference")

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """``denoise`` ended because its ``stop`` event was set."""


# ----------------------------------------------------------------------------- layout
def ramp(length: int, overlap: int) -> np.ndarray:
    """Blending weight along one axis of a tile (section 9 of the reference notes).

    Ones, with both ends multiplied by ``1/o, 2/o, ..., o/o`` so that
    neighbouring tiles fade into each other across their overlap ``o``.
    """
    w = np.ones(length, dtype=np.float32)
    if overlap > 0:
        r = (np.arange(overlap, dtype=np.float64) + 1) / overlap
        w[:overlap] *= r.astype(np.float32)
        w[length - overlap:] *= r[::-1].astype(np.float32)
    return w


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Map positions outside ``[0, size)`` back inside as numpy's ``symmetric`` padding does."""
    index = np.mod(index, 2 * size)
    return np.where(index >= size, 2 * size - 1 - index, index)


@dataclass(frozen=True)
class AxisLayout:
    """Where the tiles lie along one axis of length ``size``.

    Tile ``i`` covers ``[starts[i], starts[i] + tile)`` of the axis padded
    symmetrically by ``pad_before`` in front (and as much as needed behind).
    """

    size: int
    tile: int
    overlap: int
    pad_before: int
    starts: tuple[int, ...]

    @classmethod
    def reference(cls, size: int, tile: int, overlap: int) -> AxisLayout:
        """The reference's layout: pad by ``overlap`` in front and by
        ``stride - size % stride`` behind, a tile at every multiple of the stride."""
        stride = tile - overlap
        padded = size + overlap + stride - size % stride
        return cls(size, tile, overlap, overlap, tuple(range(0, padded - tile + 1, stride)))

    @classmethod
    def spread(cls, size: int, tile: int, overlap: int) -> AxisLayout:
        """The fewest tiles that overlap by at least ``overlap``, the first
        starting at 0 and the last ending at ``size``; an axis shorter than a
        tile is padded symmetrically on both sides."""
        if size <= tile:
            return cls(size, tile, overlap, (tile - size) // 2, (0,))
        count = math.ceil((size - overlap) / (tile - overlap))
        starts = np.rint(np.linspace(0, size - tile, count)).astype(int)
        return cls(size, tile, overlap, 0, tuple(int(s) for s in starts))

    def source(self, start: int) -> np.ndarray:
        """Indices into the unpadded axis of the tile starting at ``start``."""
        return _reflect(np.arange(start, start + self.tile) - self.pad_before, self.size)

    def crop(self, start: int) -> tuple[slice, slice]:
        """The part of the tile at ``start`` that lies inside the axis: ``(in_axis, in_tile)``."""
        lo = start - self.pad_before
        a, b = max(lo, 0), min(lo + self.tile, self.size)
        return slice(a, b), slice(a - lo, b - lo)

    def weight_sum(self) -> np.ndarray:
        """Sum of all tiles' ramps at every position of the axis."""
        total = np.zeros(self.size, dtype=np.float64)
        w = ramp(self.tile, self.overlap)
        for s in self.starts:
            inside, part = self.crop(s)
            total[inside] += w[part]
        return total


@dataclass(frozen=True)
class TilePlan:
    """The tiles of a ``[T, H, W]`` stack: the product of one layout per axis."""

    axes: tuple[AxisLayout, AxisLayout, AxisLayout]

    @classmethod
    def create(
        cls,
        shape: Sequence[int],
        tile: Sequence[int],
        overlap: Sequence[int],
        layout: str = "auto",
    ) -> TilePlan:
        if layout == "reference":
            make = AxisLayout.reference
        elif layout == "auto":
            make = AxisLayout.spread
        else:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        return cls(tuple(make(n, c, o) for n, c, o in zip(shape, tile, overlap)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(a.size for a in self.axes)

    @property
    def tile(self) -> tuple[int, int, int]:
        return tuple(a.tile for a in self.axes)

    def starts(self) -> list[tuple[int, int, int]]:
        """Tile positions in the padded stack, time-major (the order ``Blender`` needs)."""
        return list(itertools.product(*(a.starts for a in self.axes)))

    def __len__(self) -> int:
        return math.prod(len(a.starts) for a in self.axes)

    @property
    def redundancy(self) -> float:
        """Voxel-frames the network computes per voxel-frame of output: 1 when
        tiles neither overlap nor are padded, more for every overlap and padding."""
        return len(self) * math.prod(self.tile) / math.prod(self.shape)

    def describe(self) -> str:
        """One line for the log: the tiles and their redundancy."""
        overlap = tuple(a.overlap for a in self.axes)
        return (f"{len(self)} tiles of {list(self.tile)} with overlap {list(overlap)} for a stack of "
                f"{list(self.shape)}: the network computes {self.redundancy:.2f} voxel-frames per output voxel-frame")

    def weight(self) -> np.ndarray:
        """The ``[t, h, w]`` blending weight every tile's prediction is multiplied by."""
        wt, wh, ww = (ramp(a.tile, a.overlap) for a in self.axes)
        return wt[:, None, None] * wh[None, :, None] * ww[None, None, :]

    def sources(self, start: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indices into the unpadded stack of the tile at ``start``, per axis."""
        return tuple(a.source(s) for a, s in zip(self.axes, start))

    def read(self, stack: Any, start: tuple[int, int, int]) -> np.ndarray:
        """The tile at ``start`` of ``stack`` (any sliceable ``[T, H, W]`` array), padding included."""
        return _gather(stack, self.sources(start))


def _gather(array: Any, index: Sequence[np.ndarray]) -> np.ndarray:
    """``array[np.ix_(*index)]`` for any sliceable array: only the bounding box is read."""
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)
    block = np.asarray(array[box])
    if any(len(i) != b.stop - b.start or i[0] != b.start for i, b in zip(index, box)):
        block = block[np.ix_(*(i - b.start for i, b in zip(index, box)))]
    return block


# ----------------------------------------------------------------------------- blending
class Blender:
    """Weighted sum of tile predictions over one time window of the output.

    Tiles must arrive in time-major order (``TilePlan.starts``): once a tile
    starts at a later frame, every frame before it is complete, is divided
    by the summed weights and handed to ``emit(first_frame, frames)`` (a view
    of the window, which ``emit`` may change in place). Since
    the tiles form a grid, the summed weight is the product of per-axis sums
    and never needs a full-size array.
    """

    def __init__(self, plan: TilePlan, device: torch.device, emit: Callable[[int, torch.Tensor], None]):
        t_axis, h_axis, w_axis = plan.axes
        self._plan = plan
        self._emit = emit
        self._window = torch.zeros((t_axis.tile, h_axis.size, w_axis.size), device=device)
        self._origin = 0  # the output frame held in _window[0]
        self._t_sum = torch.from_numpy(t_axis.weight_sum().astype(np.float32)).to(device)
        hw = np.outer(h_axis.weight_sum(), w_axis.weight_sum())
        self._hw_sum = torch.from_numpy(hw.astype(np.float32)).to(device)

    def add(self, start: tuple[int, int, int], weighted: torch.Tensor) -> None:
        """Add one tile's prediction, already multiplied by ``TilePlan.weight``."""
        (t_in, t_part), (h_in, h_part), (w_in, w_part) = (
            a.crop(s) for a, s in zip(self._plan.axes, start)
        )
        if t_in.start > self._origin:
            self._release(t_in.start)
        t_win = slice(t_in.start - self._origin, t_in.stop - self._origin)
        self._window[t_win, h_in, w_in] += weighted[t_part, h_part, w_part]

    def finish(self) -> None:
        self._release(self._plan.shape[0])

    def _release(self, until: int) -> None:
        n = min(until, self._plan.shape[0]) - self._origin
        if n <= 0:
            return
        done = self._window[:n]
        done /= self._t_sum[self._origin:self._origin + n, None, None]
        done /= self._hw_sum
        self._emit(self._origin, done)
        rest = self._window[n:].clone()
        self._window[: len(rest)] = rest
        self._window[len(rest):] = 0
        self._origin += n


# ----------------------------------------------------------------------------- data access
class _WindowReader:
    """Reads the tiles of a stack one time window at a time.

    Tiles arrive time-major, so the frames of a window are read once and
    cut into tiles in memory: storage chunked by frames (HDF5, TIFF, zarr)
    then decodes each frame once per window instead of once per tile.
    """

    def __init__(self, stack: _Stack, plan: TilePlan):
        self._stack = stack
        self._plan = plan
        self._t_start: int | None = None
        self._frames: np.ndarray | None = None
        self._first = 0

    def tile(self, start: tuple[int, int, int]) -> np.ndarray:
        t_index, h_index, w_index = self._plan.sources(start)
        if start[0] != self._t_start:
            self._frames = None  # let the last window go before the next is read
            self._first = int(t_index.min())
            self._frames = np.asarray(self._stack[self._first:int(t_index.max()) + 1])
            self._t_start = start[0]
            self._check_finite()
        return _gather(self._frames, (t_index - self._first, h_index, w_index))

    def _check_finite(self) -> None:
        if self._frames.dtype.kind != "f" or np.isfinite(self._frames).all():
            return
        t, y, x = np.argwhere(~np.isfinite(self._frames))[0]
        where = f"frame {self._first + t}, row {y}, column {x}"
        if self._stack.lead:
            where += f" of the stack at {self._stack.lead}"
        raise DataError(f"data contains NaN or infinite values (first at {where}); replace them before denoising")


class _Stack:
    """One ``[T, H, W]`` stack inside an array of any rank, read and written lazily.

    ``lead`` fixes the extra axes; a 2-D array is a stack of one frame.
    Supports what the tiler and ``Normalization.limits`` need: ``shape``,
    slicing with up to three keys, and ``np.asarray``.
    """

    def __init__(self, array: Any, lead: tuple[int, ...], time_axis: int | None):
        self.array = array
        self.lead = lead
        self.time_axis = time_axis
        h, w = array.shape[-2:]
        t = 1 if time_axis is None else array.shape[time_axis]
        self.shape = (t, h, w)
        self.ndim = 3
        self.dtype = array.dtype

    def _index(self, key: Any) -> tuple[tuple, bool]:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        if self.time_axis is None:  # a single frame: the time key picks it or keeps a length-1 axis
            return key[1:], not isinstance(key[0], (int, np.integer))
        index = list(self.lead)
        index.insert(self.time_axis, key[0])
        return tuple(index) + key[1:], False

    def __getitem__(self, key: Any) -> np.ndarray:
        index, add_time = self._index(key)
        block = np.asarray(self.array[index])
        return block[None] if add_time else block

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        index, add_time = self._index(key)
        self.array[index] = value[0] if add_time else value

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        block = self[:]
        return block if dtype is None else block.astype(dtype, copy=False)


def _as_array(data: Any) -> Any:
    if not (hasattr(data, "shape") and hasattr(data, "dtype") and hasattr(data, "__getitem__")):
        data = np.asarray(data)
    kind = np.dtype(data.dtype).kind
    if kind not in "biuf":
        raise TypeError(f"data must hold integers or real numbers, got dtype {data.dtype}")
    if len(data.shape) < 2:
        raise ValueError(f"data must be at least 2-D ([H, W] or [T, H, W]), got shape {list(data.shape)}")
    if 0 in data.shape:
        raise ValueError(f"data is empty (shape {list(data.shape)})")
    return data


def _time_axis(shape: tuple[int, ...], time_axis: int | None) -> int | None:
    ndim = len(shape)
    if ndim == 2:
        if time_axis is not None:
            raise ValueError(f"data is a single [H, W] image (shape {list(shape)}); it has no time axis")
        return None
    if time_axis is None:
        if ndim == 3:
            return 0
        raise ValueError(
            f"data has {ndim} axes (shape {list(shape)}); say which one is time with time_axis= "
            "(the last two axes are height and width)"
        )
    axis = int(time_axis) % ndim if -ndim <= int(time_axis) < ndim else ndim
    if axis >= ndim - 2:
        raise ValueError(
            f"time_axis={time_axis} must name one of the first {ndim - 2} axes of shape {list(shape)} "
            "(the last two are height and width)"
        )
    return axis


def _stacks(shape: tuple[int, ...], time_axis: int | None) -> list[tuple[int, ...]]:
    """The index of every ``[T, H, W]`` stack along the extra leading axes."""
    extra = [n for i, n in enumerate(shape[:-2]) if i != time_axis]
    return list(itertools.product(*(range(n) for n in extra)))


def _check_out(out: Any, data: Any) -> None:
    if not hasattr(out, "__setitem__") or not hasattr(out, "shape"):
        raise TypeError(f"out must be a writable array (numpy, HDF5, zarr, ...), got {type(out).__name__}")
    if tuple(out.shape) != tuple(data.shape):
        raise ValueError(f"out has shape {list(out.shape)}, but data has shape {list(data.shape)}")
    same = out is data
    if isinstance(out, np.ndarray) and isinstance(data, np.ndarray):
        same = np.may_share_memory(out, data)
    elif hasattr(out, "id") and hasattr(data, "id"):  # two handles on one HDF5 dataset
        same = same or out.id == data.id
    if same:
        raise ValueError("out must not be the input: the input is read again after outputs are written")


def _storable(frames: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip for integer outputs, which would otherwise wrap around."""
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(frames), info.min, info.max).astype(dtype)
    return frames


# ----------------------------------------------------------------------------- choices
def _resolve_model(model: Any) -> torch.nn.Module:
    from .model.checkpoint import load_model
    from .model.denoiser import CNNTDenoiser

    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if not isinstance(model, CNNTDenoiser):
        raise TypeError(f"model must be a CNNTDenoiser, a model file path or None, got {type(model).__name__}")
    return model


def _resolve_normalization(normalization: Any, model: torch.nn.Module) -> Normalization:
    if normalization is None:
        return model.normalization
    if isinstance(normalization, Normalization):
        return normalization
    if normalization == "none":
        return Normalization.none()
    if isinstance(normalization, Mapping):
        return Normalization.from_dict(normalization)
    raise TypeError(
        f"normalization must be None (the model's), 'none', a Normalization or a dict, got {normalization!r}"
    )


def whole(value: Any, name: str) -> int:
    """An integer setting as given: ``2.5`` or ``"3"`` is refused rather than truncated."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise TypeError(f"{name} must be a whole number, got {value!r}")


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    try:
        t = tuple(whole(v, name) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be three integers (time, height, width), got {value!r}") from None
    if len(t) != 3:
        raise ValueError(f"{name} must be three integers (time, height, width), got {list(t)}")
    return t


# Peak activation memory of one forward pass, in float32 values per input voxel,
# measured on the CPU for the "small" and "reference" presets (about 570 and 1260).
def _floats_per_voxel(config: Any) -> int:
    return 20 * max(config.blocks[0], config.blocks[1]) + config.pre_channels[1]


def _free_memory(device: torch.device) -> int:
    """Bytes the device can still give to the network."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 4 << 30


def _tile_bytes(config: Any, tile: Sequence[int]) -> int:
    return 4 * _floats_per_voxel(config) * math.prod(tile)


def auto_layout(
    config: Any, shape: Sequence[int], runtime: Runtime
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The automatic ``(tile, overlap)`` of a ``[T, H, W]`` stack.

    Height and width: the model's training patch, fitted to the stack and
    halved while one tile would need more than half the device's free memory,
    with a quarter of it as overlap. Larger tiles or smaller overlaps would
    compute less twice, but cost accuracy: instance norm normalises every
    frame of a tile by its own statistics, which match the training patch's
    only on tiles of its size, and tile borders are less accurate than their
    middle. Measured with the bundled model (64 x 64 patch) on the sample
    data: 128 x 128 tiles lose 0.34 dB, whole 256 x 256 frames 2.3 dB, an
    overlap of 8 instead of 16 pixels 0.1 dB.

    Time: attention takes windows of any length, so the stack is cut into the
    fewest windows of the training length up to a quarter longer that overlap
    by a quarter of the training length, each as short as that allows: 32
    frames run as two windows of 18 rather than three of 16, 1.13 instead of
    1.5 computed frames per frame, at the same accuracy (measured likewise).
    """
    m = config.size_multiple
    t, h, w = fit_tile((config.time, config.height, config.width), shape, config)
    budget = _free_memory(runtime.device) // 2
    while config.norm_mode != "layer" and _tile_bytes(config, (t, h, w)) > budget and max(h, w) > 4 * m:
        h, w = _round_up(h // 2, m), _round_up(w // 2, m)
    t_overlap = config.time // 4
    if shape[0] > t:
        t = _time_window(shape[0], config.time, t_overlap)
    tile = (t, h, w)
    overlap = tuple(min(o, c - 1) for o, c in zip((t_overlap, h // 4, w // 4), tile))
    return tile, overlap


def _time_window(frames: int, window: int, overlap: int) -> int:
    """The shortest window from ``window`` to ``window + overlap`` frames long
    that covers ``frames`` with as few windows, overlapping by ``overlap``, as the longest would."""
    longest = window + overlap
    if frames <= longest:
        return frames
    count = math.ceil((frames - overlap) / (longest - overlap))
    return max(window, math.ceil((frames + (count - 1) * overlap) / count))


def auto_tile(config: Any, shape: Sequence[int], runtime: Runtime) -> tuple[int, int, int]:
    """The tile of :func:`auto_layout`."""
    return auto_layout(config, shape, runtime)[0]


# On a CPU, tiles per network call stop paying once a call's activations
# outgrow the cache: measured for the small preset, four 16 x 64 x 64 tiles run
# 7% faster per tile than one, but two 16 x 128 x 128 tiles run 1.7x slower in
# float32 (and no faster in bf16) than one.
_CPU_BATCH_VOXELS = 16 * 128 * 128


def auto_batch_size(config: Any, tile: Sequence[int], runtime: Runtime) -> int:
    """As many tiles as fit in half the device's free memory: up to 16 on CUDA,
    4 on other GPUs; on a CPU, up to 4 and no more than 16 x 128 x 128 voxels a call."""
    cap = {"cuda": 16, "cpu": max(1, min(4, _CPU_BATCH_VOXELS // math.prod(tile)))}.get(runtime.device.type, 4)
    return int(max(1, min(cap, (_free_memory(runtime.device) // 2) // _tile_bytes(config, tile))))


def fit_tile(tile: Sequence[int], shape: Sequence[int], config: Any) -> tuple[int, int, int]:
    """Shrink ``tile`` to the stack (height and width rounded up to the model's
    size multiple), so that a small stack is not padded to a large tile.

    A stack shorter than the time window runs as one window of all its
    frames. Layer-norm models only take their training height and width.
    """
    m = config.size_multiple
    t = min(tile[0], shape[0])
    if config.norm_mode == "layer":
        return t, tile[1], tile[2]
    return t, min(tile[1], _round_up(shape[1], m)), min(tile[2], _round_up(shape[2], m))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check_tile(tile: tuple[int, int, int], overlap: tuple[int, int, int], config: Any) -> None:
    if min(tile) < 1:
        raise ValueError(f"tile sizes must be positive, got {list(tile)}")
    config.check_frame_size(tile[1], tile[2], "tiles")
    if not all(0 <= o < c for c, o in zip(tile, overlap)):
        raise ValueError(
            f"overlap must be at least 0 and smaller than the tile, got {list(overlap)} for tile {list(tile)}"
        )


# ----------------------------------------------------------------------------- driver
def denoise(
    data: Any,
    model: Any = None,
    *,
    tile: Sequence[int] | None = None,
    overlap: Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | Runtime | None = None,
    normalization: Normalization | Mapping | str | None = None,
    layout: str = "auto",
    progress: Callable[[int, int], Any] | None = None,
    stop: Any = None,
    out: Any = None,
    time_axis: int | None = None,
    cancel: Any = None,
) -> Any:
    """Denoise a time-lapse stack of any size, tile by tile.

    Parameters
    ----------
    data
        ``[T, H, W]`` or ``[H, W]`` (one frame), any integer or real dtype;
        numpy, memmap, HDF5, zarr or dask arrays are read tile by tile.
        With more axes (``[P, T, H, W]``, ...) ``time_axis`` says which is
        time and every stack along the others is denoised in turn.
    model
        A ``CNNTDenoiser``, the path of a model file, or ``None`` for the
        bundled model. It is not modified (a copy runs).
    tile, overlap
        ``(time, height, width)`` of a tile and of the overlap between
        neighbouring tiles. By default :func:`auto_layout`: the model's
        training patch, shrunk to the stack and to the device's memory, in
        time windows stretched to cover the stack with few of them, and a
        quarter of the patch as overlap. A given tile overlaps by a quarter
        of itself unless ``overlap`` is given.
    batch_size
        Tiles per network call; by default as many as fit the device's memory.
    device
        ``"auto"`` (CUDA, then MPS, then the CPU), an explicit device, or a
        :class:`~napari_cnnt.runtime.Runtime` to also choose the bf16 fast path.
    normalization
        ``None`` for the model's, ``"none"`` for data already in [0, 1], a
        ``Normalization`` or its dict. Limits are computed once per stack;
        the result is mapped back to the input's units.
    layout
        ``"auto"``: the fewest tiles that cover the stack with at least the
        given overlap. ``"reference"``: the reference implementation's layout
        and float32 arithmetic (unless ``device`` is a ``Runtime``), which
        reproduces its numbers.
    progress
        Called as ``progress(tiles_done, tiles_total)`` after every batch.
    stop
        A ``threading.Event`` (or a callable returning ``True``) checked before
        every batch; when set, :class:`Cancelled` is raised. ``data`` is never
        modified; ``out`` may hold the frames finished so far. (Its former
        name, ``cancel``, is still accepted.)
    out
        A writable array of ``data``'s shape (numpy, memmap, HDF5, zarr) to
        write into, for stacks larger than memory. Integer outputs are rounded
        and clipped.

    Returns
    -------
    ``out``, or a new float32 array of ``data``'s shape.
    """
    data = _as_array(data)
    shape = tuple(int(n) for n in data.shape)
    t_axis = _time_axis(shape, None if time_axis is None else whole(time_axis, "time_axis"))
    if out is not None:
        _check_out(out, data)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if batch_size is not None and whole(batch_size, "batch_size") < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    cancelled = stop_requested(renamed(stop, cancel, "stop", "cancel", "denoise"))
    check_progress(progress)

    net = _resolve_model(model)
    config = net.config
    norm = _resolve_normalization(normalization, net)
    if isinstance(device, Runtime):
        runtime = device
    else:
        runtime = Runtime.create(device, fast=False if layout == "reference" else None)

    stack_shape = (1 if t_axis is None else shape[t_axis],) + shape[-2:]
    auto_overlap = None
    if tile is not None:
        tile = _triple(tile, "tile")
    elif layout == "reference":
        tile = (config.time, config.height, config.width)
    else:
        tile, auto_overlap = auto_layout(config, stack_shape, runtime)
    if overlap is not None:
        overlap = _triple(overlap, "overlap")
    else:
        overlap = auto_overlap or tuple(c // 4 for c in tile)
    _check_tile(tile, overlap, config)
    if layout == "auto":
        tile = fit_tile(tile, stack_shape, config)
        overlap = tuple(min(o, c - 1) for o, c in zip(overlap, tile))
    plan = TilePlan.create(stack_shape, tile, overlap, layout)
    log.debug(plan.describe())
    batch_size = int(batch_size or auto_batch_size(config, tile, runtime))

    result = out if out is not None else np.empty(shape, dtype=np.float32)
    leads = _stacks(shape, t_axis)
    total = len(plan) * len(leads)
    done = 0

    def after_batch(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    net = runtime.inference_copy(net)
    with _reader(runtime.device) as reader, torch.inference_mode():
        for lead in leads:
            source = _Stack(data, lead, t_axis)
            target = _Stack(result, lead, t_axis)
            limits = norm.limits(source)
            _denoise_stack(source, target, plan, limits, net, runtime, batch_size, reader, cancelled, after_batch)
    return result


def _denoise_stack(
    source: _Stack,
    target: _Stack,
    plan: TilePlan,
    limits: tuple[float, float],
    net: torch.nn.Module,
    runtime: Runtime,
    batch_size: int,
    reader: concurrent.futures.Executor,
    cancelled: Callable[[], bool],
    after_batch: Callable[[int], None],
) -> None:
    """Run every tile of one stack; ``reader`` reads the next batch while the network runs this one."""
    lo, hi = limits

    def emit(first: int, frames: torch.Tensor) -> None:
        frames = frames.mul_(hi - lo).add_(lo).cpu().numpy()
        if not np.isfinite(frames).all():
            raise DataError(f"the result is not finite from frame {first} on: the intensities ({lo:.3g} to {hi:.3g}) "
                            "are beyond what the network computes in 32 bits")
        target[first:first + len(frames)] = _storable(frames, target.dtype)

    blender = Blender(plan, runtime.device, emit)
    tiles = _WindowReader(source, plan)
    weight = torch.from_numpy(plan.weight()).to(runtime.device)
    starts = plan.starts()
    batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
    pin = runtime.device.type == "cuda"  # page-locked batches copy to the GPU while it computes
    pending = reader.submit(_read_batch, tiles, plan, batches[0], lo, hi, pin)
    for i, batch in enumerate(batches):
        if cancelled():
            raise Cancelled("denoising was cancelled")
        x = pending.result()
        if i + 1 < len(batches):
            pending = reader.submit(_read_batch, tiles, plan, batches[i + 1], lo, hi, pin)
        y = runtime.predict(net, x)[:, :, 0].mul_(weight)
        for start, pred in zip(batch, y):
            blender.add(start, pred)
        after_batch(len(batch))
    blender.finish()


def _reader(device: torch.device) -> concurrent.futures.Executor:
    """One thread reading ahead for an accelerator; none for a CPU network,
    which already uses every core and would only be slowed down by it."""
    if device.type == "cpu":
        return _Inline()
    return concurrent.futures.ThreadPoolExecutor(max_workers=1)


class _Inline(concurrent.futures.Executor):
    """An executor that runs each task at once, in the calling thread."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # handed to whoever asks for the result, as a thread pool would
            future.set_exception(e)
        return future


def _read_batch(
    tiles: _WindowReader,
    plan: TilePlan,
    starts: list[tuple[int, int, int]],
    lo: float,
    hi: float,
    pin: bool = False,
) -> torch.Tensor:
    """Read and normalise a batch of tiles into one ``[B, t, 1, h, w]`` float32 tensor
    (in page-locked memory if ``pin``)."""
    batch = torch.empty((len(starts), plan.tile[0], 1) + plan.tile[1:], dtype=torch.float32, pin_memory=pin)
    x = batch.numpy()
    for tile, start in zip(x, starts):
        tile[:, 0] = tiles.tile(start)
    if (lo, hi) != (0.0, 1.0):
        x -= np.float32(lo)
        x /= np.float32(hi - lo)
    return batch


__all__ = [
    "AxisLayout", "Blender", "Cancelled", "LAYOUTS", "TilePlan",
    "auto_batch_size", "auto_layout", "auto_tile", "denoise", "fit_tile", "ramp",
]
