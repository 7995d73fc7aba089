"""Simulated fluorescence time-lapses with a known clean truth.

A scene of moving structures (nuclei, filaments, puncta, membranes,
mitochondria) is rendered as
fluorophore density per frame, drifts, bleaches, is blurred by a Gaussian
PSF and recorded by a camera model:

    ADU = gain * (Poisson(QE * photons) + Normal(0, read_noise**2)) + offset

rounded and clipped to the camera's bit depth. The clean stack is the
expected value of the same camera, ``gain * QE * photons + offset``, so both
are in the same ADU units. Everything is numpy and seeded, so the same
arguments give the same stacks on every machine.

A structure type is a function ``(rng, shape, drift, density) -> fluorophores``
in :data:`STRUCTURES`, where ``density`` scales how many objects there are
(sparse to crowded fields); adding a structure type is adding a function.
:func:`random_conditions` draws acquisition settings over the range real
microscopes cover, for training data.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

Structure = Callable[..., np.ndarray]


def _splat(shape: tuple[int, int, int], t: np.ndarray, y: np.ndarray, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Deposit point sources (frame ``t``, sub-pixel ``y``, ``x``, weight ``w``) with bilinear weights."""
    T, H, W = shape
    t, y, x, w = (np.broadcast_to(a, np.broadcast_shapes(t.shape, y.shape, x.shape, w.shape)).ravel()
                  for a in (t, y, x, w))
    y0, x0 = np.floor(y), np.floor(x)
    fy, fx = y - y0, x - x0
    out = np.zeros(T * H * W)
    for dy, dx, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yi, xi = y0.astype(np.int64) + dy, x0.astype(np.int64) + dx
        ok = (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
        out += np.bincount((t[ok] * H + yi[ok]) * W + xi[ok], weights=(w * wt)[ok], minlength=T * H * W)
    return out.reshape(shape).astype(np.float32)


def nucleus(rng: np.random.Generator, shape: tuple[int, int, int], drift: np.ndarray,
            density: float = 1.0) -> np.ndarray:
    """Large, slowly moving and turning ellipses (one per unit of density) with chromatin texture."""
    out = _one_nucleus(rng, shape, drift)
    for _ in range(max(1, round(density)) - 1):
        out = np.maximum(out, _one_nucleus(rng, shape, drift))
    return out


def _one_nucleus(rng: np.random.Generator, shape: tuple[int, int, int], drift: np.ndarray) -> np.ndarray:
    T, H, W = shape
    size = min(H, W)
    a, b = size * rng.uniform(0.14, 0.22), size * rng.uniform(0.11, 0.16)
    centre = np.array([H, W]) * rng.uniform(0.35, 0.65, 2) + np.cumsum(rng.normal(0, 0.15, (T, 2)), axis=0)
    centre += drift
    angle = rng.uniform(0, np.pi) + np.linspace(0, rng.normal(0, 0.2), T)
    # Only the box the nucleus can reach is computed; the rest stays dark.
    reach = 1.3 * max(a, b)
    y0, x0 = (max(0, int(centre[:, i].min() - reach)) for i in (0, 1))
    y1, x1 = min(H, int(centre[:, 0].max() + reach) + 1), min(W, int(centre[:, 1].max() + reach) + 1)
    out = np.zeros(shape, np.float32)
    if y1 <= y0 or x1 <= x0:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy = yy[None] - centre[:, 0, None, None].astype(np.float32)
    dx = xx[None] - centre[:, 1, None, None].astype(np.float32)
    c, s = np.cos(angle)[:, None, None].astype(np.float32), np.sin(angle)[:, None, None].astype(np.float32)
    u, v = c * dx + s * dy, c * dy - s * dx  # coordinates that move and turn with the nucleus
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    inside = 1.0 / (1.0 + np.exp((r - 1.0) * 12.0))
    texture = np.ones_like(u)
    for _ in range(4):
        k = rng.uniform(0.08, 0.25, 2) * (2 * np.pi / (b / 2))
        texture += 0.2 * np.sin(k[0] * u / 2 + k[1] * v / 2 + rng.uniform(0, 2 * np.pi))
    out[:, y0:y1, x0:x1] = 0.25 * inside * np.clip(texture, 0.2, None)
    return out


def filaments(rng: np.random.Generator, shape: tuple[int, int, int], drift: np.ndarray,
              density: float = 1.0) -> np.ndarray:
    """Smooth curved fibres that glide and undulate."""
    T, H, W = shape
    n = max(2, round(8 * density * H * W / 256**2))
    step = 0.5
    t = np.arange(T)[:, None]
    points = []
    for _ in range(n):
        length = rng.uniform(0.3, 0.8) * max(H, W)
        s = np.arange(0, length, step)[None, :]
        amp, k, omega = rng.uniform(0.1, 0.6), rng.uniform(0.01, 0.05), rng.normal(0, 0.05)
        heading = rng.uniform(0, 2 * np.pi) + amp * np.sin(k * s + omega * t + rng.uniform(0, 2 * np.pi))
        start = np.array([H, W]) * rng.uniform(0.05, 0.95, 2) + rng.normal(0, 0.3, 2) * t + drift
        y = start[:, 0, None] + np.cumsum(step * np.sin(heading), axis=1)
        x = start[:, 1, None] + np.cumsum(step * np.cos(heading), axis=1)
        w = np.full(y.shape, step * rng.uniform(0.5, 1.0))
        points.append((np.broadcast_to(t, y.shape).ravel(), y.ravel(), x.ravel(), w.ravel()))
    return _splat(shape, *(np.concatenate(p) for p in zip(*points)))


def puncta(rng: np.random.Generator, shape: tuple[int, int, int], drift: np.ndarray,
           density: float = 1.0, blinking: float = 0.0) -> np.ndarray:
    """Diffraction-limited vesicles: some diffuse, some are transported in straight runs.

    ``blinking``: probability per frame that a punctum switches between on and off.
    """
    T, H, W = shape
    n = max(4, round(60 * density * H * W / 256**2))
    start = np.array([H, W]) * rng.uniform(0, 1, (n, 2))
    velocity = rng.normal(0, 1.0, (n, 2)) * (rng.uniform(0, 1, (n, 1)) < 0.3)
    steps = rng.normal(0, 0.5, (T, n, 2)) + velocity
    steps[0] = 0
    pos = start + np.cumsum(steps, axis=0) + drift[:, None, :]
    brightness = 6.0 * rng.lognormal(0.0, 0.4, n)[None, :]
    if blinking > 0:
        switches = rng.uniform(0, 1, (T, n)) < blinking
        brightness = brightness * (np.cumsum(switches, axis=0) % 2 == 0)
    t = np.broadcast_to(np.arange(T)[:, None], (T, n))
    return _splat(shape, t, pos[..., 0], pos[..., 1], brightness)


def membranes(rng: np.random.Generator, shape: tuple[int, int, int], drift: np.ndarray,
              density: float = 1.0) -> np.ndarray:
    """Cell outlines: closed wavy contours whose shape changes slowly, as plasma membranes do."""
    T, H, W = shape
    n = max(1, round(5 * density * H * W / 256**2))
    t = np.arange(T)[:, None]
    points = []
    for _ in range(n):
        radius = rng.uniform(0.08, 0.2) * min(H, W)
        centre = np.array([H, W]) * rng.uniform(0.1, 0.9, 2) + np.cumsum(rng.normal(0, 0.2, (T, 2)), axis=0) + drift
        k = np.arange(2, 6)
        amp = rng.uniform(0, 0.08, k.size)
        phase = rng.uniform(0, 2 * np.pi, k.size) + np.outer(np.arange(T), rng.normal(0, 0.05, k.size))
        theta = np.arange(0, 2 * np.pi, 0.5 / radius)[None, :]
        r = radius * (1 + sum(amp[i] * np.cos(k[i] * theta + phase[:, i, None]) for i in range(k.size)))
        y = centre[:, 0, None] + r * np.sin(theta)
        x = centre[:, 1, None] + r * np.cos(theta)
        w = np.full(y.shape, 0.5 * rng.uniform(0.5, 1.0))
        points.append((np.broadcast_to(t, y.shape).ravel(), y.ravel(), x.ravel(), w.ravel()))
    return _splat(shape, *(np.concatenate(p) for p in zip(*points)))


def mitochondria(rng: np.random.Generator, shape: tuple[int, int, int], drift: np.ndarray,
                 density: float = 1.0) -> np.ndarray:
    """Tubular networks: short, thick, curved tubes, some branched, that wriggle and creep.

    Unlike filaments they are a few pixels wide before the PSF, a few microns
    long and often end in the field, and a third of them carry a side branch.
    """
    T, H, W = shape
    n = max(2, round(30 * density * H * W / 256**2))
    step = 0.5
    t = np.arange(T)[:, None]
    points = []

    def tube(start, heading0, length, radius, brightness, wiggle):
        s = np.arange(0, length, step)[None, :]
        bend = rng.uniform(-0.08, 0.08) * s + wiggle * np.sin(rng.uniform(0.05, 0.2) * s + rng.normal(0, 0.08) * t)
        heading = heading0 + bend
        y = start[:, 0, None] + np.cumsum(step * np.sin(heading), axis=1)
        x = start[:, 1, None] + np.cumsum(step * np.cos(heading), axis=1)
        # The tube's cross-section: parallel lines across its width.
        for offset in np.linspace(-radius, radius, max(2, int(2 * radius / step) + 1)):
            weight = step * step * brightness * np.sqrt(max(0.0, 1 - (offset / (radius + 0.5)) ** 2))
            yy, xx = y + offset * np.cos(heading), x - offset * np.sin(heading)
            points.append((np.broadcast_to(t, y.shape).ravel(), yy.ravel(), xx.ravel(),
                           np.full(y.size, weight)))
        return y, x, heading

    for _ in range(n):
        start = (np.array([H, W]) * rng.uniform(0.05, 0.95, 2) + np.cumsum(rng.normal(0, 0.15, (T, 2)), axis=0)
                 + drift)
        length, radius = rng.uniform(8, 40), rng.uniform(1.0, 2.0)
        brightness = rng.uniform(0.5, 1.0)
        y, x, heading = tube(start, rng.uniform(0, 2 * np.pi), length, radius, brightness, rng.uniform(0.1, 0.5))
        if rng.uniform() < 1 / 3 and y.shape[1] > 4:
            k = int(rng.integers(y.shape[1] // 4, y.shape[1]))
            fork = np.stack([y[:, k], x[:, k]], axis=1)
            side = heading[:, k] + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
            tube(fork, side[:, None], rng.uniform(5, 20), 0.8 * radius, brightness, rng.uniform(0.1, 0.3))
    return _splat(shape, *(np.concatenate(p) for p in zip(*points)))


STRUCTURES: dict[str, Structure] = {
    "nucleus": nucleus, "filaments": filaments, "puncta": puncta, "membranes": membranes,
    "mitochondria": mitochondria,
}

BACKBONE_STRUCTURES = ("nucleus", "filaments", "puncta")
"""The structures the bundled backbone was trained on; the others are kept out of its training data
so that benchmarks can measure fine-tuning on structures it never saw."""


def _blur(stack: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian PSF applied to every frame (in Fourier space; the caller pads the edges)."""
    if sigma <= 0:
        return stack
    fy = np.fft.fftfreq(stack.shape[-2]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(stack.shape[-1]).astype(np.float32)[None, :]
    otf = np.exp(-2 * np.pi**2 * sigma**2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(stack) * otf, s=stack.shape[-2:]).astype(np.float32)


def simulate(
    shape: tuple[int, int, int] = (32, 256, 256),
    structures: Sequence[str] = ("nucleus", "filaments", "puncta"),
    peak_photons: float = 40.0,
    background_photons: float = 3.0,
    read_noise: float = 1.6,
    gain: float = 2.0,
    offset: float = 100.0,
    qe: float = 0.8,
    bleach_per_frame: float = 0.01,
    drift: float = 0.2,
    psf_sigma: float = 1.5,
    bit_depth: int = 16,
    seed: int = 0,
    density: float = 1.0,
    blinking: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A noisy time-lapse and its clean truth, both ``[T, H, W]`` in camera ADU.

    ``peak_photons``: photons reaching the brightest pixel of the first frame
    (plus ``background_photons`` everywhere); ``read_noise`` in electrons
    (rms), ``gain`` in ADU per electron, ``offset`` in ADU; ``drift``: rms
    stage drift per frame in pixels; ``psf_sigma`` in pixels. The defaults
    resemble a dim live-cell sCMOS recording.

    Returns ``(noisy, clean)``: ``noisy`` uint16 (0 to ``2**bit_depth - 1``),
    ``clean`` float32, its expected value.
    """
    T, H, W = (int(n) for n in shape)
    unknown = [s for s in structures if s not in STRUCTURES]
    if unknown:
        raise ValueError(f"unknown structure(s) {unknown}; choose from {sorted(STRUCTURES)}")
    if not 1 <= bit_depth <= 16:
        raise ValueError(f"bit_depth must be 1 to 16, got {bit_depth}")
    pad = int(np.ceil(4 * psf_sigma))
    padded = (T, H + 2 * pad, W + 2 * pad)
    rng = np.random.default_rng(seed)
    stage = np.cumsum(rng.normal(0, drift, (T, 2)), axis=0)
    density_map = np.zeros(padded, np.float32)
    for name in dict.fromkeys(structures):
        # Each structure type has its own stream, so choosing others leaves it unchanged.
        sub = np.random.default_rng([seed, zlib.crc32(name.encode())])
        extra = {"blinking": blinking} if name == "puncta" else {}
        density_map += STRUCTURES[name](sub, padded, stage, density=density, **extra)
    signal = _blur(density_map, psf_sigma)[:, pad : pad + H, pad : pad + W]
    signal *= np.exp(-bleach_per_frame * np.arange(T, dtype=np.float32))[:, None, None]
    peak = float(signal[0].max()) if signal.size else 0.0
    if peak > 0:
        signal *= peak_photons / peak
    photons = np.clip(signal, 0, None) + np.float32(background_photons)
    electrons = rng.poisson(qe * photons).astype(np.float32)
    electrons += rng.normal(0, read_noise, photons.shape).astype(np.float32)
    top = 2**bit_depth - 1
    noisy = np.clip(np.rint(gain * electrons + offset), 0, top).astype(np.uint16)
    clean = (gain * qe * photons + offset).astype(np.float32)
    return noisy, clean


SAMPLE_SHAPE = (32, 256, 256)


def sample_recording() -> tuple[np.ndarray, np.ndarray]:
    """The plugin's sample data: a dim live-cell recording and its clean truth."""
    return simulate(SAMPLE_SHAPE, seed=0)


def random_conditions(rng: np.random.Generator) -> dict[str, float]:
    """Acquisition settings drawn over the range of real live-cell recordings.

    Peak signal from 5 to 1000 photons (log-uniform), read noise 1-6 e-,
    sCMOS/EMCCD-like gains and offsets, PSFs, bleaching, drift, sparse to
    crowded fields and, for half of the recordings, blinking.
    """
    return {
        "peak_photons": float(np.exp(rng.uniform(np.log(5), np.log(1000)))),
        "background_photons": float(rng.uniform(0, 10)),
        "read_noise": float(rng.uniform(1, 6)),
        "gain": float(rng.uniform(0.5, 4)),
        "offset": float(rng.uniform(50, 500)),
        "psf_sigma": float(rng.uniform(1.0, 2.5)),
        "bleach_per_frame": float(rng.uniform(0, 0.03)),
        "drift": float(rng.uniform(0, 0.5)),
        "density": float(np.exp(rng.uniform(np.log(0.3), np.log(3)))),
        "blinking": float(rng.uniform(0, 0.2)) if rng.uniform() < 0.5 else 0.0,
    }


def random_recording(
    shape: tuple[int, int, int], seed: int, structures: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """A recording with random conditions and a random non-empty mix of ``structures``.

    Returns ``(noisy, clean, settings)``; the same seed gives the same recording.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    pool = list(structures) if structures is not None else list(STRUCTURES)
    chosen = [s for s in pool if rng.uniform() < 0.5] or [pool[rng.integers(len(pool))]]
    settings = {**random_conditions(rng), "structures": tuple(chosen)}
    noisy, clean = simulate(shape, seed=seed, **settings)
    return noisy, clean, settings


__all__ = ["BACKBONE_STRUCTURES", "STRUCTURES", "SAMPLE_SHAPE", "simulate", "sample_recording", "random_conditions",
           "random_recording", "nucleus", "filaments", "puncta", "membranes", "mitochondria"]
