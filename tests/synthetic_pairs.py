"""Tiny noisy/clean time-lapse pairs of two structure types, for training tests."""

import numpy as np
from scipy.ndimage import gaussian_filter


def structure(kind: str, rng: np.random.Generator, shape=(6, 32, 32)) -> np.ndarray:
    """A clean [T, H, W] stack in [0, 1]: ``lines`` (filaments) or ``blobs`` (puncta), drifting slowly."""
    T, H, W = shape
    frame = np.zeros((H + 8, W + 8), np.float32)
    if kind == "lines":
        for _ in range(4):
            y0, x0 = rng.uniform(0, H + 8, 2)
            angle = rng.uniform(0, np.pi)
            t = np.linspace(-H, H, 4 * H)
            ys = np.clip((y0 + t * np.sin(angle)).astype(int), 0, H + 7)
            xs = np.clip((x0 + t * np.cos(angle)).astype(int), 0, W + 7)
            frame[ys, xs] = 1.0
        frame = gaussian_filter(frame, 0.8)
    elif kind == "blobs":
        for _ in range(6):
            y, x = rng.integers(2, H + 6, 2)
            frame[y, x] = 1.0
        frame = gaussian_filter(frame, 2.0)
    else:
        raise ValueError(kind)
    frame = 0.1 + 0.8 * frame / frame.max()
    return np.stack([frame[t % 4 : t % 4 + H, 2 : 2 + W] for t in range(T)]).astype(np.float32)


def pair(kind: str, seed: int, shape=(6, 32, 32), noise: float = 0.15):
    """(noisy, clean): the clean stack plus Gaussian noise of standard deviation ``noise``."""
    rng = np.random.default_rng(seed)
    clean = structure(kind, rng, shape)
    noisy = clean + rng.normal(0, noise, clean.shape).astype(np.float32)
    return noisy, clean
