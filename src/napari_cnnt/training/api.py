"""``finetune`` and ``train``: the Python entry points to the training engine."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..control import renamed
from ..losses import CombinedLoss
from ..metrics import truth_range
from ..model.config import CNNTConfig, preset
from ..model.denoiser import CNNTDenoiser
from ..normalization import Normalization
from ..runtime import Runtime
from .data import Sample, Split, samples_from_h5, samples_from_pairs, split_samples
from .history import History, Progress
from .plan import Plan, fit_to_time, plan_run
from .recipes import DEFAULT_TRAIN, FEW_SAMPLE, Recipe, get_recipe, recipe_for
from .settings import TrainSettings
from .trainer import Trainer, metrics


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def load_samples(data: Any, normalization: Normalization, prefix: str) -> list[Sample]:
    """Samples from pairs of arrays or noisy arrays alone, or from the path(s) of CNNT HDF5 files."""
    if _is_path(data):
        return samples_from_h5(data, normalization)
    if isinstance(data, (list, tuple)) and data and all(_is_path(d) for d in data):
        return [s for path in data for s in samples_from_h5(path, normalization)]
    return samples_from_pairs(data, normalization, prefix)


def provenance(
    history: History, base: str | None, settings: TrainSettings, recipe: str | None = None
) -> dict[str, Any]:
    """What a trained model's file records about its training (see ``save_model``)."""
    meta = {
        "training_data": history.split.to_dict() if history.split else None,
        "epochs": len(history),
        "best_epoch": history.best_epoch,
        "metrics": history.best,
        "training": {**({"recipe": recipe} if recipe else {}), **settings.to_dict()},
        "outcome": history.summary(),
    }
    if history.notes:
        meta["training_notes"] = list(history.notes)
    if base is not None:
        meta["base_model"] = base
    if history.stopped:
        meta["stopped_at_epoch"] = f"{len(history) + 1} of {settings.epochs}"
    return meta


def prepare_run(
    model: CNNTDenoiser,
    data: Any,
    val_data: Any,
    recipe: str | Recipe | None,
    options: dict[str, Any],
    runtime: Runtime,
    checkpoint: str | os.PathLike | None = None,
) -> tuple[list[Sample], list[Sample], Split, Plan]:
    """Samples, the split and the plan of a run (one step timed), before any training: what the
    widget estimates from. A run resumed from ``checkpoint`` keeps the epochs it was planned with.
    ``recipe=None`` chooses by the data (:func:`~napari_cnnt.training.recipes.recipe_for`); the
    plan's ``recipe`` names the one used."""
    (FEW_SAMPLE if recipe is None else get_recipe(recipe)).with_options(**options)  # refused before reading
    norm = model.normalization
    samples = load_samples(data, norm, "pair")
    if val_data is None or isinstance(val_data, str) or (isinstance(val_data, (list, tuple)) and not val_data):
        val = val_data if val_data is None or isinstance(val_data, str) else []
    else:
        val = load_samples(val_data, norm, "val pair")
    recipe = recipe_for(recipe, all(s.has_truth for s in samples + (val if isinstance(val, list) else [])))
    train, val, split = split_samples(samples, val)
    parameters = sum(p.numel() for p in model.parameters())
    if recipe.minutes and checkpoint is not None and os.path.exists(checkpoint) and "epochs" not in options:
        options = {**options, "epochs": planned_epochs(checkpoint)}
    plan = plan_run(recipe, options, model.config, train, val, runtime, parameters)
    val_patches = len(val) * plan.settings.val_patches_per_sample * (1 if plan.settings.val_patch_size else 2)
    plan = fit_to_time(recipe, options, plan, model, runtime, val_patches)
    plan.recipe = recipe.name
    return train, val, split, plan


def planned_epochs(checkpoint: str | os.PathLike) -> int:
    """The epochs a checkpointed run with a time budget was planned with."""
    from .checkpoints import read_training_checkpoint

    return int(json.loads(read_training_checkpoint(checkpoint)["fingerprint"])["settings"]["epochs"])


def _run(
    model: CNNTDenoiser,
    data: Any,
    val_data: Any,
    recipe: str | Recipe,
    options: dict[str, Any],
    base: str | None,
    device: Any,
    fast: bool | None,
    **engine: Any,
) -> tuple[CNNTDenoiser, History]:
    runtime = device if isinstance(device, Runtime) else Runtime.create(device, fast)
    train, val, split, plan = prepare_run(model, data, val_data, recipe, options, runtime, engine.get("checkpoint"))
    trainer = Trainer(model, train, val, plan.settings, split=split, device=runtime.device, fast=runtime.fast,
                      **engine)
    trained, history = trainer.run()
    history.notes = plan.notes + [n for n in history.notes if n not in plan.notes]
    trained.metadata = {**model.metadata, **provenance(history, base, plan.settings, plan.recipe)}
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
    recipe: str | Recipe | None = None,
    *,
    val_pairs: Any = None,
    device: str | torch.device | Runtime | None = None,
    fast: bool | None = None,
    progress: Callable[[Progress], Any] | None = None,
    stop: Any = None,
    checkpoint: str | os.PathLike | None = None,
    callback: Callable[[Progress], Any] | None = None,
    **options: Any,
) -> tuple[CNNTDenoiser, History]:
    """Adapt a trained model to new data from a few pairs, or from noisy stacks alone;
    returns ``(model, history)``.

    ``model`` is left unchanged; the returned copy has the weights that
    validated best (the starting ones among the candidates: see
    ``history.summary()``) and keeps the model's intensity normalisation,
    with which the training data are scaled.

    Parameters
    ----------
    pairs
        ``(noisy, clean)`` arrays, each ``[T, H, W]`` (or ``[H, W]``), or
        ``(noisy, clean, rois)`` with ``(top, left, bottom, right)`` boxes;
        or the path(s) of CNNT HDF5 files. A noisy stack without a clean
        image, as a bare array or ``(noisy, None)``, trains self-supervised
        (by default every other frame learns to predict the frames in between:
        :mod:`~napari_cnnt.training.interlace`);
        pairs and noisy stacks can be mixed.
    recipe
        ``"few-sample"`` (the default when every sample has a clean image: a
        budget of steps fitted to the data and the machine),
        ``"self-supervised"`` (the default when some have none: validated by
        that loss, ``history.metric == "val_interlaced_loss"``),
        ``"reference"`` (the CNNT paper's fine-tuning recipe) or a
        :class:`~napari_cnnt.training.recipes.Recipe`; see
        :data:`~napari_cnnt.training.recipes.RECIPES`.
    val_pairs
        Validation data, like ``pairs``. By default, with up to three pairs
        the last quarter of each pair (its width, height or frames)
        validates and the rest trains; with more, the last fifth of the
        pairs validates (see ``history.split``). ``"regions"``: a part of
        every pair validates. ``[]``: no validation, the last weights are kept.
    device, fast
        Where to train (``None``: GPU if any) and whether to use bfloat16
        (``None``: where the hardware supports it).
    progress
        Called with a :class:`Progress` after every step and epoch (its former
        name, ``callback``, is still accepted).
    stop
        A ``threading.Event`` or a callable returning True; once set, training
        ends before the next step and the best weights so far are returned.
    checkpoint
        A file saved atomically at the start and after every epoch. If it
        exists, training resumes from it (the run's settings must match).
    options
        :class:`TrainSettings` fields replacing the recipe's (``epochs``,
        ``lr``, ``patch_sizes``, ``batch_size``, ``seed``, ...). They are
        used as given; settings that cannot fit the data or the memory are
        refused with a :class:`~napari_cnnt.training.plan.SettingError`.
    """
    if not isinstance(model, CNNTDenoiser):
        raise TypeError(f"finetune expects a CNNTDenoiser (e.g. from load_model()), got {type(model).__name__}")
    base = model.metadata.get("file") or model.metadata.get("source") or "in-memory model"
    progress = renamed(progress, callback, "progress", "callback", "finetune")
    return _run(model, pairs, val_pairs, recipe, options, str(base), device, fast,
                progress=progress, stop=stop, checkpoint=checkpoint)


def train(
    data: Any,
    recipe: str | Recipe = DEFAULT_TRAIN,
    *,
    config: CNNTConfig | str = "small",
    normalization: Normalization | None = None,
    val_data: Any = None,
    device: str | torch.device | Runtime | None = None,
    fast: bool | None = None,
    progress: Callable[[Progress], Any] | None = None,
    stop: Any = None,
    checkpoint: str | os.PathLike | None = None,
    callback: Callable[[Progress], Any] | None = None,
    **options: Any,
) -> tuple[CNNTDenoiser, History]:
    """Train a new model from scratch (a backbone); returns ``(model, history)``.

    The default recipe is the reference's backbone recipe (``"backbone"``).
    ``config`` is a :class:`CNNTConfig` or a preset name; its ``time``,
    ``height`` and ``width`` are set to the first patch. ``normalization``
    scales the data and is stored with the model (default: fixed 0..65536,
    the reference's). ``data`` and ``val_data`` take what ``finetune``'s
    ``pairs`` takes; the other parameters are ``finetune``'s.
    """
    cfg = preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, CNNTConfig):
        raise TypeError(f"config must be a CNNTConfig or a preset name, got {type(config).__name__}")
    settings = get_recipe(recipe).with_options(**options)
    h, w = settings.patch_sizes[0]
    model = new_model(cfg.replace(time=settings.time, height=h, width=w), normalization or Normalization(),
                      settings.seed)
    runtime = device if isinstance(device, Runtime) else Runtime.create(device, fast)
    train_samples, val, split, plan = prepare_run(model, data, val_data, recipe, options, runtime)
    (h, w), t = plan.settings.patch_sizes[0], plan.settings.time
    if (t, h, w) != (model.config.time, model.config.height, model.config.width):
        model = new_model(cfg.replace(time=t, height=h, width=w), model.normalization, plan.settings.seed)
    progress = renamed(progress, callback, "progress", "callback", "train")
    trainer = Trainer(model, train_samples, val, plan.settings, split=split, device=runtime.device,
                      fast=runtime.fast, progress=progress, stop=stop, checkpoint=checkpoint)
    trained, history = trainer.run()
    history.notes = list(plan.notes)
    trained.metadata = {**model.metadata, **provenance(history, None, plan.settings, get_recipe(recipe).name)}
    return trained, history


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
    if not all(s.has_truth for s in samples):
        raise ValueError("evaluate compares with clean images: every sample needs one, (noisy, clean)")
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
