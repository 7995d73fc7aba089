"""Named training recipes: every default of ``finetune``, ``train``, the command line and the widget.

A :class:`Recipe` is a frozen :class:`TrainSettings` plus the names of the
settings it leaves to the data and the machine (``auto``): those are upper
bounds that :func:`~napari_cnnt.training.plan.plan_run` fits to the samples
and to the memory at hand. Everything else is used as written. Settings a
caller gives explicitly replace the recipe's and are never changed: if they
cannot work they are refused with a sentence naming them.

The objective is part of a recipe too: the loss that is minimised and the
validation metric the kept weights are selected by (``loss``,
``loss_weights``, ``select``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .settings import SELF_SUPERVISED_SCORES, TrainSettings, score_of

# Settings a recipe may leave to the data and the machine.
AUTO_SETTINGS = ("patch_sizes", "time", "batch_size", "val_patch_size")


@dataclass(frozen=True)
class Recipe:
    """A named, documented set of training settings.

    ``auto`` lists settings (from :data:`AUTO_SETTINGS`) whose values in
    ``settings`` are upper bounds to be fitted to the data and the machine.
    ``minutes`` is a time budget for training: on a machine too slow to run
    all epochs in it, fewer are run (not fewer than ``min_epochs``), unless
    the caller gives ``epochs``.
    """

    name: str
    description: str
    settings: TrainSettings
    auto: frozenset[str] = field(default_factory=frozenset)
    minutes: float | None = None
    min_epochs: int = 1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.auto) - set(AUTO_SETTINGS))
        if unknown:
            raise ValueError(f"recipe {self.name!r}: settings {unknown} cannot be chosen automatically")

    def with_options(self, **options: Any) -> TrainSettings:
        """The recipe's settings with ``options`` replacing some of them (unknown names are refused)."""
        unknown = sorted(set(options) - set(TrainSettings.names()))
        if unknown:
            raise TypeError(
                f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(TrainSettings.names())}"
            )
        if "objective" in options and "select" not in options and self.settings.select in SELF_SUPERVISED_SCORES:
            options = {**options, "select": score_of(options["objective"])}  # each objective's own score
        return TrainSettings(**{**self.settings.to_dict(), **options})


FEW_SAMPLE = Recipe(
    "few-sample",
    "Fine-tuning the bundled model on a few pairs on a laptop CPU (the default). A budget of 120 "
    "optimiser steps (12 rounds of 10, validated after each; fewer rounds, at least 3, where they "
    "would take more than 8 minutes on this machine), 4 random patches a step dealt evenly "
    "from the samples, flips, quarter turns and time reversal; AdamW at up to 2e-4 with a 10 % "
    "linear warm-up and a cosine decay; loss ssim + mse. Patches of up to 64 x 64 x 16 frames, "
    "never larger than the samples; the batch shrinks to fit in memory. The starting weights are "
    "validated too, the weights with the best validation PSNR are kept, and training ends after "
    "6 rounds without improvement.",
    TrainSettings(
        epochs=12, steps_per_epoch=10, lr=2e-4, scheduler="WarmupCosine", warmup=0.1,
        loss=("ssim", "mse"), loss_weights=(1.0, 1.0), patch_sizes=((64, 64),), time=16, batch_size=4,
        val_patches_per_sample=3, optimizer="adamw", betas=(0.9, 0.99), weight_decay=0.0,
        clip_grad_norm=1.0, select="val_psnr", patience=6, augment=("flip", "rot90", "time_reverse"),
    ),
    frozenset({"patch_sizes", "time", "batch_size", "val_patch_size"}),
    minutes=8.0,
    min_epochs=3,
)

REFERENCE = Recipe(
    "reference",
    "The CNNT paper's fine-tuning recipe, for reproducing it: 30 epochs (each sample gives one "
    "patch of each size per epoch), AdamW lr 2.5e-5 with betas 0.9/0.95 and weight decay 0.1, "
    "loss ssim + 0.1 mse, patches 128 x 128 and 160 x 160 x 16 frames, batch 8, gradient "
    "clipping at 1.0, ReduceLROnPlateau, flips; the weights with the best validation loss are kept.",
    TrainSettings(
        epochs=30, lr=2.5e-5, betas=(0.9, 0.95), weight_decay=0.1, loss=("ssim", "mse"), loss_weights=(1.0, 0.1),
        patch_sizes=((128, 128), (160, 160)), time=16, batch_size=8, clip_grad_norm=1.0,
        scheduler="ReduceLROnPlateau", optimizer="adamw", select="val_loss", augment=("flip",),
    ),
)

BACKBONE = Recipe(
    "backbone",
    "The CNNT paper's recipe for training a backbone from scratch (``train``): LSUV "
    "initialisation, 300 epochs, AdamW lr 5e-4, loss ssim, patches 128 and 160 x 16 frames, "
    "batch 8, ReduceLROnPlateau.",
    TrainSettings(
        epochs=300, lr=5e-4, loss=("ssim",), loss_weights=(1.0,), patch_sizes=((128, 128), (160, 160)),
        time=16, batch_size=8, lsuv=True,
    ),
)

SELF_SUPERVISED = Recipe(
    "self-supervised",
    "Fine-tuning on noisy stacks alone, without clean images (the default when a sample has "
    "none): every other frame is the input and the loss is the squared error against the mean of "
    "its two neighbouring frames, whose noise the network never sees, each moved onto the frame "
    "along the optical flow of the starting model's output (single frames hide pixels instead). A "
    "budget of 240 optimiser steps, each half as costly as a few-sample one (24 rounds of 10, "
    "validated after each; fewer rounds, at least 3, where they would take more than 8 minutes "
    "on this machine), 4 random "
    "patches a step, flips, quarter turns and time reversal; AdamW at up to 2e-4 with a 10 % "
    "warm-up and a cosine decay. Patches of up to 64 x 64 x 16 frames. Validation is the same "
    "loss on held-out regions (8 fixed patches a sample); the starting weights are validated too "
    "and kept unless an epoch improves on them by at least 0.05 %. Pairs given beside noisy stacks "
    "train with ssim + mse.",
    # The few-sample schedule and augmentations, twice the steps (measured in docs/training.md:
    # +0.97 -> +1.26 dB on membranes, +0.67 -> +0.75 dB on mitochondria); validated without truth.
    dataclasses.replace(
        FEW_SAMPLE.settings, epochs=24, val_patches_per_sample=8, select="val_interlaced_loss", min_gain=0.0005,
        objective="interlaced", motion="flow",
    ),
    frozenset({"patch_sizes", "time", "batch_size", "val_patch_size"}),
    minutes=8.0,
    min_epochs=3,
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (FEW_SAMPLE, SELF_SUPERVISED, REFERENCE, BACKBONE)}
DEFAULT_FINETUNE = FEW_SAMPLE.name
DEFAULT_TRAIN = BACKBONE.name


def recipe_for(recipe: str | Recipe | None, has_truth: bool) -> Recipe:
    """The recipe a fine-tuning run uses: the one named, or by default few-sample when every
    sample has a clean image and self-supervised when some have none."""
    if recipe is None:
        return FEW_SAMPLE if has_truth else SELF_SUPERVISED
    return get_recipe(recipe)


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A recipe by name (see :data:`RECIPES`), or the recipe given."""
    if isinstance(recipe, Recipe):
        return recipe
    try:
        return RECIPES[recipe]
    except (KeyError, TypeError):
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}") from None


__all__ = ["AUTO_SETTINGS", "BACKBONE", "FEW_SAMPLE", "RECIPES", "REFERENCE", "SELF_SUPERVISED", "Recipe",
           "get_recipe", "recipe_for"]
