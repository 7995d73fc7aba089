"""What the Fine-tune widget's controls describe, without Qt: the settings parsed from its text fields, the
training data chosen from layers or a file, the state of a run, and the sentences it shows.

The widget (:mod:`.finetune`) only reads its controls, calls these, and shows the results; everything here is
tested without a display.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Shapes

from ...io import ImageFileError
from ...io.hdf5 import open_training_pairs
from ...losses import LOSSES
from ...training.data import h5_keys, held_out_count
from ...training.plan import minutes_text
from ...training.recipes import RECIPES, Recipe
from ._messages import UserError, sentence, shape_text
from .models import ModelEntry

LAYERS, FILE = "Image layers", "HDF5 training file"
WHOLE = "whole images"
MEMORY_HINT = "Try a smaller batch size, smaller patches or a shorter time window."
AUTO = "auto"
FINETUNE_RECIPES = ("few-sample", "self-supervised", "reference")
NO_CLEAN = "none: learn from the noisy layer itself"
SELF_SUPERVISED = "self-supervised"
# How the controls name the settings a refusal is about.
SETTING_NAMES = {"patch_sizes": "'Patch sizes'", "val_patch_size": "'Patch sizes'", "batch_size": "'Batch size'",
                 "time": "'Time window'", "epochs": "'Epochs'", "lr": "'Learning rate'",
                 "steps_per_epoch": "'Steps per epoch'"}


# ----------------------------------------------------------------------------- parsing
def parse_losses(text: str) -> tuple[list[str], list[float]]:
    """``"ssim 1.0, mse 0.1"`` -> ``(["ssim", "mse"], [1.0, 0.1])``; a missing weight is 1."""
    names, weights = [], []
    lookup = {k.lower(): k for k in LOSSES}
    for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        words = part.replace("*", " ").split()
        try:
            name, weight = words[0], float(words[1]) if len(words) > 1 else 1.0
            if len(words) > 2 or name.lower() not in lookup:
                raise ValueError
        except (ValueError, IndexError):
            raise UserError(
                f"'{part}' is not a loss: write name and weight pairs separated by commas, e.g. "
                f"'ssim 1.0, mse 0.1'; the losses are {', '.join(LOSSES)}."
            ) from None
        names.append(lookup[name.lower()])
        weights.append(weight)
    if not names:
        raise UserError("Give at least one loss, e.g. 'ssim 1.0, mse 0.1'.")
    return names, weights


def parse_patch_sizes(text: str) -> list[tuple[int, int]] | None:
    """``"128, 160"`` or ``"128x96"`` -> ``[(128, 128), (160, 160)]`` / ``[(128, 96)]``; ``"auto"`` -> None."""
    if text.strip().lower() == AUTO:
        return None
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*(?:[x\u00d7]\s*(\d+))?", part.lower())
        if match is None or int(match[1]) < 1 or int(match[2] or match[1]) < 1:
            raise UserError(
                f"'{part}' is not a patch size: write sizes in pixels separated by commas, e.g. '128, 160' "
                "or '128x96'."
            )
        sizes.append((int(match[1]), int(match[2] or match[1])))
    if not sizes:
        raise UserError("Give at least one patch size, e.g. '128, 160', or 'auto'.")
    return sizes


def parse_learning_rate(text: str) -> float:
    try:
        lr = float(text)
        if not 0 < lr < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"The learning rate must be a number between 0 and 1, e.g. 2.5e-5; got '{text}'.") from None
    return lr


def _format_losses(names: tuple[str, ...], weights: tuple[float, ...]) -> str:
    return ", ".join(f"{n} {w:g}" for n, w in zip(names, weights))


def _format_patches(sizes: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(str(h) if h == w else f"{h}x{w}" for h, w in sizes)


# ----------------------------------------------------------------------------- recipes and controls
def recipe_controls(recipe: Recipe) -> dict[str, Any]:
    """The controls' values for ``recipe``: text fields as text, 0 (shown as "auto") where it leaves a setting to
    the data."""
    r = recipe.settings
    return {
        "epochs": r.epochs,
        "steps": r.steps_per_epoch,
        "lr": f"{r.lr:g}",
        "losses": _format_losses(r.loss, r.loss_weights),
        "patch_sizes": AUTO if "patch_sizes" in recipe.auto else _format_patches(r.patch_sizes),
        "time": 0 if "time" in recipe.auto else r.time,
        "batch_size": 0 if "batch_size" in recipe.auto else r.batch_size,
    }


def finetune_options(recipe: Recipe, controls: dict[str, Any]) -> dict[str, Any]:
    """``finetune`` options from the controls' values (as :func:`recipe_controls` names them): only those that
    differ from the recipe's, automatic ones left out; raises :class:`UserError`."""
    names, weights = parse_losses(controls["losses"])
    patch_sizes = parse_patch_sizes(controls["patch_sizes"])
    values = {
        "epochs": controls["epochs"],
        "steps_per_epoch": controls["steps"],
        "lr": parse_learning_rate(controls["lr"]),
        "loss": tuple(names),
        "loss_weights": tuple(weights),
        "patch_sizes": None if patch_sizes is None else tuple(patch_sizes),
        "time": controls["time"] or None,
        "batch_size": controls["batch_size"] or None,
    }
    r = recipe.settings
    return {k: v for k, v in values.items() if v is not None and v != getattr(r, k)}


# ----------------------------------------------------------------------------- training data
@dataclass
class TrainingData:
    """The samples chosen in the widget, read into memory only on the worker thread.

    Each item of ``items`` is ``(name, read)`` where ``read()`` returns
    ``(noisy, clean)`` or ``(noisy, clean, roi)``; the last ``n_val`` validate.
    ``title`` names the data in short (for the model's name), ``source`` in full.
    """

    items: list[tuple[str, Callable[[], tuple]]]
    n_val: int
    title: str
    source: str

    def names(self) -> list[str]:
        return [name for name, _ in self.items]

    def split_text(self) -> str:
        names, k = self.names(), self.n_val
        if not names:
            return "No training samples."
        if k == 0:
            return (f"{_count(len(names))} train; the last quarter of each (its width, height or frames) "
                    "validates.")
        return f"Training on {_list(names[:-k])}; validating on {_list(names[-k:])}."

    def load(self) -> tuple[list[tuple], list[tuple] | str]:
        """Training pairs and validation pairs, or ``"regions"`` when a part of each sample validates."""
        pairs = [read() for _, read in self.items]
        if self.n_val == 0:
            return pairs, "regions"
        return pairs[: -self.n_val], pairs[-self.n_val:]


def _count(n: int) -> str:
    return "1 sample" if n == 1 else f"{n} samples"


def _list(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def layer_rois(shapes: Shapes, image: Image) -> list[tuple[int, int, int, int]]:
    """The bounding boxes ``(top, left, bottom, right)`` of the shapes, in the image's pixels."""
    s_scale, s_shift = np.asarray(shapes.scale)[-2:], np.asarray(shapes.translate)[-2:]
    i_scale, i_shift = np.asarray(image.scale)[-2:], np.asarray(image.translate)[-2:]
    height, width = image.data.shape[-2:]
    rois = []
    for vertices in shapes.data:
        yx = (np.asarray(vertices)[:, -2:] * s_scale + s_shift - i_shift) / i_scale
        top, left = np.floor(yx.min(axis=0)).astype(int)
        bottom, right = np.ceil(yx.max(axis=0)).astype(int)
        top, left, bottom, right = max(top, 0), max(left, 0), min(bottom, height), min(right, width)
        if bottom > top and right > left:
            rois.append((int(top), int(left), int(bottom), int(right)))
    return rois


def _layer_pair(noisy: Any, clean: Any, index: int | None, roi: Any) -> Callable[[], tuple]:
    def read() -> tuple:
        n, c = (None if a is None else np.asarray(a if index is None else a[index]) for a in (noisy, clean))
        return (n, c) if roi is None else (n, c, roi)
    return read


def layers_data(noisy: Image | None, clean: Any, first: int, regions: Any, n_val: int) -> TrainingData:
    """Samples from a noisy and a clean layer (``clean`` :data:`NO_CLEAN`: the noisy layer alone):
    ``[T, Y, X]`` (one sample) or ``[S, T, Y, X]``."""
    alone = clean == NO_CLEAN
    if noisy is None or clean is None:
        raise UserError("Choose a noisy and a clean image layer (open the sample data to try it out).")
    if noisy is clean:
        raise UserError(f"The noisy and the clean layer are both '{noisy.name}': choose two different layers, "
                        f"or Clean '{NO_CLEAN}'.")
    for layer in (noisy,) if alone else (noisy, clean):
        if layer.rgb or layer.multiscale or not 2 <= layer.ndim <= 4:
            raise UserError(
                f"'{layer.name}' cannot be used for training: it must be a single-channel [T, Y, X] stack, "
                "or [samples, T, Y, X]."
            )
    if not alone and tuple(noisy.data.shape) != tuple(clean.data.shape):
        raise UserError(
            f"The noisy and clean layers must have the same shape: '{noisy.name}' is "
            f"{shape_text(noisy.data.shape)}, '{clean.name}' is {shape_text(clean.data.shape)}."
        )
    indices = [None] if noisy.ndim < 4 else list(range(noisy.data.shape[0]))
    if first > 0:
        indices = indices[:first]
    rois: list[Any] = [None]
    if isinstance(regions, Shapes):
        rois = layer_rois(regions, noisy)
        if not rois:
            raise UserError(f"No shape in '{regions.name}' lies on '{noisy.name}': draw rectangles on the image.")
    items = []
    for i in indices:
        for j, roi in enumerate(rois):
            name = noisy.name + ("" if i is None else f" #{i}") + ("" if roi is None else f" region {j + 1}")
            items.append((name, _layer_pair(noisy.data, None if alone else clean.data, i, roi)))
    source = (f"layer '{noisy.name}' (noisy, no clean image)" if alone
              else f"layers '{noisy.name}' (noisy) and '{clean.name}' (clean)")
    return TrainingData(items, _check_val(n_val, len(items)), noisy.name, source)


def file_data(path: Path | None, first: int, n_val: int) -> TrainingData:
    """Samples from the groups of a CNNT HDF5 training file, in file order."""
    if path is None or not Path(path).is_file():
        raise UserError("Choose a CNNT HDF5 training file (one group per sample, with noisy_im and clean_im).")
    try:
        keys = h5_keys(path)
    except (ImageFileError, OSError) as e:
        raise UserError(sentence(f"This training file cannot be used: {e}")) from None
    if first > 0:
        keys = keys[:first]
    items = [(f"{Path(path).name}:{k}", _h5_reader(path, k)) for k in keys]
    return TrainingData(items, _check_val(n_val, len(items)), Path(path).name, f"file {Path(path).name}")


def _h5_reader(path: Path, key: str) -> Callable[[], tuple]:
    def read() -> tuple:
        with open_training_pairs(path) as pairs:
            noisy, clean = next((n, c) for name, n, c in pairs if name == key)
            return noisy[()], clean[()]
    return read


def _check_val(n_val: int, n: int) -> int:
    if n > 0 and n_val >= n:
        raise UserError(
            f"Only {n} sample(s) are in use, so at most {n - 1} can be held out for validation "
            "(0: the last quarter of every sample validates)."
        )
    return n_val


def default_held_out(n: int) -> int:
    """As ``finetune`` does: with up to three samples a part of each validates (0), with more a fifth."""
    return held_out_count(n)


# ----------------------------------------------------------------------------- a run
@dataclass
class FinetuneResult:
    """A finished run: the new model's entry in the session's list, its history, and what to save with it."""

    entry: ModelEntry
    history: Any
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class FinetuneRun:
    """The state of one fine-tuning run, from Start to its end.

    ``base`` is the model's entry it started from, ``data`` and ``options`` what
    it trains on and with (the recipe's name and the options that differ from
    it); ``records`` grows by one per epoch; ``result`` is set when it succeeds.
    """

    base: ModelEntry
    data: TrainingData
    recipe: str
    options: dict[str, Any]
    records: list[dict[str, float]] = field(default_factory=list)
    result: FinetuneResult | None = None

    @property
    def epochs(self) -> int:
        return self.options.get("epochs", RECIPES[self.recipe].settings.epochs)

    def provenance(self) -> dict[str, Any]:
        """What a saved model records about this run."""
        return {"training_source": self.data.source, "fine_tuning": {"recipe": self.recipe, **self.options}}

    def model_name(self) -> str:
        return f"{self.base.name} fine-tuned on {self.data.title}"


# ----------------------------------------------------------------------------- texts
def estimate_text(plan: Any, estimate: Any) -> str:
    """E.g. "About 6 min on this machine: 120 steps of 4 x 16 x 64 x 64, peak memory about 2.1 GB."."""
    s = plan.settings
    h, w = max(s.patch_sizes, key=lambda hw: hw[0] * hw[1])
    text = (f"About {minutes_text(estimate.seconds)} on this machine: {estimate.steps} steps of "
            f"{s.batch_size} x {s.time} x {h} x {w}, peak memory about {estimate.peak_bytes / 2**30:.1f} GB.")
    return " ".join([text, *(sentence(n) for n in plan.notes)])


def summary(history: Any, epochs: int) -> str:
    """How a run ended, in one sentence for the progress line and the notification."""
    psnr = history.best.get("val_psnr")
    quality = f" (validation PSNR {psnr:.1f} dB)" if psnr is not None and math.isfinite(psnr) else ""
    kept = history.summary()
    if not history.kept_start:
        kept += quality
    if history.stopped:
        return f"Stopped after {len(history)} of {epochs} epochs; {kept}."
    if history.early:
        return f"Ended after {len(history)} of {epochs} epochs, as validation stopped improving; {kept}."
    return f"Finished {epochs} epoch{'s' if epochs != 1 else ''}; {kept}."
