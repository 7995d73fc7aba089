"""npe2 sample data: a synthetic noisy time-lapse and its clean truth.

The same seed gives the same stacks, so the noisy and clean samples match
when opened one after the other.
"""

from __future__ import annotations

import functools

import numpy as np

from ..synthetic import simulate

SHAPE = (32, 256, 256)
SEED = 0
PIXEL_UM = 0.1
FRAME_S = 1.0


@functools.lru_cache(maxsize=1)
def _simulated() -> tuple[np.ndarray, np.ndarray]:
    return simulate(SHAPE, seed=SEED)


def _stacks() -> tuple[np.ndarray, np.ndarray]:
    """Copies, so that a layer edited in place leaves the other sample intact."""
    return tuple(a.copy() for a in _simulated())


def _meta(name: str, role: str) -> dict:
    return {
        "name": name,
        "scale": (FRAME_S, PIXEL_UM, PIXEL_UM),
        "axis_labels": ("T", "Y", "X"),
        "units": ("s", "um", "um"),
        "metadata": {"sample": "synthetic", "role": role, "axes": "TYX"},
    }


def noisy_timelapse() -> list[tuple]:
    return [(_stacks()[0], _meta("synthetic noisy", "noisy"), "image")]


def clean_timelapse() -> list[tuple]:
    return [(_stacks()[1], _meta("synthetic clean", "clean"), "image")]


def noisy_clean_pair() -> list[tuple]:
    return noisy_timelapse() + clean_timelapse()
