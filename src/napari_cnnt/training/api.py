"""``finetune`` and ``train``: the Python entry points to the training engine."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..losses import CombinedLoss
from ..metrics import truth_range
from ..model.config import CNNTConfig, preset
from ..model.denoiser import CNNTDenoiser
from ..normalization import Normalization
from ..runtime import Runtime
from .data import Sample, patch_sizes_of, samples_from_h5, samples_from_pairs, split_samples
from .history import History, Progress
from .trainer import Trainer, TrainSettings, metrics


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def load_samples(data: Any, normalization: Normalization, prefix: str) -> list[Sample]:
    """Samples from pairs of arrays, or from the path(s) of CNNT HDF5 files."""
    if _is_path(data):
        return samples_from_h5(data, normalization)
    if isinstance(data, (list, tuple)) and data and all(_is_path(d) for d in data):
        return [s for path in data for s in samples_from_h5(path, normalization)]
    return samples_from_pairs(data, normalization, prefix)


def _settings(options: dict[str, Any], **named: Any) -> TrainSettings:
    unknown = sorted(set(options) - set(TrainSettings.names()))
    if unknown:
        raise TypeError(
            f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(TrainSettings.names())}"
        )
    return TrainSettings(**named, **options)


def provenance(history: History, base: str | None, settings: TrainSettings) -> dict[str, Any]:
    """What a trained model's file records about its training (see ``save_model``)."""
    meta = {
        "training_data": history.split.to_dict() if history.split else None,
        "epochs": len(history),
        "best_epoch": history.best_epoch,
        "metrics": history.best,
        "training": settings.to_dict(),
    }
    if base is not None:
        meta["base_model"] = base
    if history.stopped:
        meta["stopped_at_epoch"] = f"{len(history) + 1} of {settings.epochs}"
    return meta


def _run(
    model: CNNTDenoiser,
    data: Any,
    val_data: Any,
    settings: TrainSettings,
    base: str | None,
    **engine: Any,
) -> tuple[CNNTDenoiser, History]:
    norm = model.normalization
    samples = load_samples(data, norm, "pair")
    if val_data is None or (isinstance(val_data, (list, tuple)) and not val_data):
        val = None if val_data is None else []
    else:
        val = load_samples(val_data, norm, "val pair")
    train, val, split = split_samples(samples, val)
    trained, history = Trainer(model, train, val, settings, split=split, **engine).run()
    trained.metadata = {**model.metadata, **provenance(history, base, settings)}
    return trained, history


def new_model(config: CNNTConfig, normalization: Normalization, seed: int) -> CNNTDenoiser:
    """A freshly initialised model; the same seed gives the same weights (the caller's RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CNNTDenoiser(config)
    model.normalization = normalization
    return model


def finetune(
    model: CNNTDenoiser,
    pairs: Any,
    *,
    epochs: int = 30,
    lr: float = 2.5e-5,
    loss: Sequence[str] | str = ("ssim", "mse"),
    loss_weights: Sequence[float] = (1.0, 0.1),
    patch_sizes: Any = (128, 160),
    time: int = 16,
    batch_size: int = 8,
    val_pairs: Any = None,
    device: str | torch.device | None = None,
    fast: bool | None = None,
    callback: Callable[[Progress], Any] | None = None,
    stop: Any = None,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    **options: Any,
) -> tuple[CNNTDenoiser, History]:
    """Adapt a trained model to new data from a few pairs; returns ``(model, history)``.

    The defaults are the reference's fine-tuning recipe. ``model`` is left
    unchanged; the returned copy has the best weights by validation loss
    (possibly the starting ones) and keeps the model's intensity
    normalisation, with which the training data are scaled.

    Parameters
    ----------
    pairs
        ``(noisy, clean)`` arrays, each ``[T, H, W]`` (or ``[H, W]``), or
        ``(noisy, clean, rois)`` with ``(top, left, bottom, right)`` boxes;
        or the path(s) of CNNT HDF5 files.
    patch_sizes
        Patch sizes, one sampler each: ints for squares or ``(h, w)``.
        Multiples of ``model.config.size_multiple``.
    val_pairs
        Validation data, like ``pairs``. By default the last fifth of the
        pairs validates (a single pair validates itself); see
        ``history.split``. ``[]``: no validation, the last weights are kept.
    device, fast
        Where to train (``None``: GPU if any) and whether to use bfloat16
        (``None``: where the hardware supports it).
    callback
        Called with a :class:`Progress` after every step and epoch.
    stop
        A ``threading.Event``; once set, training ends before the next step
        and the best weights so far are returned.
    checkpoint
        A file saved atomically at the start and after every epoch. If it
        exists, training resumes from it (the run's settings must match).
    options
        Further :class:`TrainSettings` (``scheduler``, ``clip_grad_norm``,
        ``patches_per_sample``, ...).
    """
    if not isinstance(model, CNNTDenoiser):
        raise TypeError(f"finetune expects a CNNTDenoiser (e.g. from load_model()), got {type(model).__name__}")
    settings = _settings(
        options, epochs=epochs, lr=lr, loss=loss, loss_weights=loss_weights, patch_sizes=patch_sizes,
        time=time, batch_size=batch_size, seed=seed,
    )
    base = model.metadata.get("file") or model.metadata.get("source") or "in-memory model"
    return _run(model, pairs, val_pairs, settings, str(base), device=device, fast=fast,
                callback=callback, stop=stop, checkpoint=checkpoint)


def train(
    data: Any,
    *,
    config: CNNTConfig | str = "small",
    normalization: Normalization | None = None,
    epochs: int = 300,
    lr: float = 5e-4,
    loss: Sequence[str] | str = ("ssim",),
    loss_weights: Sequence[float] = (1.0,),
    patch_sizes: Any = (128, 160),
    time: int = 16,
    batch_size: int = 8,
    val_data: Any = None,
    lsuv: bool = True,
    device: str | torch.device | None = None,
    fast: bool | None = None,
    callback: Callable[[Progress], Any] | None = None,
    stop: Any = None,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    **options: Any,
) -> tuple[CNNTDenoiser, History]:
    """Train a new model from scratch (a backbone); returns ``(model, history)``.

    The defaults are the reference's backbone recipe. ``config`` is a
    :class:`CNNTConfig` or a preset name; its ``time``, ``height`` and
    ``width`` are set to the first patch. ``normalization`` scales the data
    and is stored with the model (default: fixed 0..65536, the reference's).
    ``data`` and ``val_data`` take what ``finetune``'s ``pairs`` takes; the
    other parameters are ``finetune``'s.
    """
    cfg = preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, CNNTConfig):
        raise TypeError(f"config must be a CNNTConfig or a preset name, got {type(config).__name__}")
    h, w = patch_sizes_of(patch_sizes)[0]
    cfg = cfg.replace(time=int(time), height=h, width=w)
    settings = _settings(
        options, epochs=epochs, lr=lr, loss=loss, loss_weights=loss_weights, patch_sizes=patch_sizes,
        time=time, batch_size=batch_size, lsuv=lsuv, seed=seed,
    )
    model = new_model(cfg, normalization or Normalization(), seed)
    return _run(model, data, val_data, settings, None, device=device, fast=fast,
                callback=callback, stop=stop, checkpoint=checkpoint)


def evaluate(
    model: CNNTDenoiser,
    data: Any,
    *,
    loss: Sequence[str] | str = ("ssim", "mse"),
    loss_weights: Sequence[float] = (1.0, 0.1),
    device: str | torch.device | None = None,
    fast: bool | None = None,
) -> dict[str, float]:
    """Mean loss, PSNR and SSIM of ``model`` over whole stacks, denoised tile by tile
    (PSNR as ``napari_cnnt.metrics`` defines it, per stack).

    ``data`` takes what ``finetune``'s ``pairs`` takes, or a list of
    :class:`Sample`; stacks are scaled with the model's normalisation.
    """
    from ..inference import denoise

    samples = data if data and all(isinstance(d, Sample) for d in data) else load_samples(
        data, model.normalization, "pair")
    runtime = Runtime.create(device, fast)
    loss_fn = CombinedLoss(loss, loss_weights)
    totals = [0.0, 0.0, 0.0]
    for s in samples:
        out = denoise(s.noisy, model, device=runtime, normalization="none")
        values = metrics(torch.from_numpy(out)[None, :, None], torch.from_numpy(s.clean)[None, :, None], loss_fn,
                         truth_range(s.clean))
        totals = [t + v for t, v in zip(totals, values)]
    n = len(samples)
    return {"loss": totals[0] / n, "psnr": totals[1] / n, "ssim": totals[2] / n}
