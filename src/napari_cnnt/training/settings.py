"""The settings of a training run: every knob besides the model and the data, checked when made."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ..losses import CombinedLoss
from ..model.config import CNNTConfig
from .data import AREA_THRES, AUGMENTATIONS, VALUE_THRES, patch_sizes_of
from .interlace import MOTIONS

SCHEDULERS = ("ReduceLROnPlateau", "StepLR", "OneCycleLR", "WarmupCosine", "none")
# Schedules that step every batch and are planned for the whole run.
PER_STEP = ("OneCycleLR", "WarmupCosine")
# What the kept weights can be selected by: validation metrics, and whether higher is better.
SELECT = {"val_loss": False, "val_psnr": True, "val_ssim": True, "val_interlaced_loss": False, "val_masked_loss": False}
# Metrics that compare with a clean image, which noisy-only validation samples do not have.
NEEDS_TRUTH = ("val_loss", "val_psnr", "val_ssim")
OPTIMIZERS = ("adamw", "nadam", "sgd")
# How samples without truth are learnt from (``objective``), and the validation score of each, which
# needs no truth: the interlaced objective (:mod:`~napari_cnnt.training.interlace`) and the blind spot
# (:mod:`~napari_cnnt.training.blindspot`).
OBJECTIVES = ("interlaced", "blind-spot")
SELF_SUPERVISED_SCORES = {"val_interlaced_loss": "interlaced", "val_masked_loss": "blind-spot"}
# What every validation reports (NaN where it was not measured).
VALIDATION_KEYS = ("val_loss", "val_psnr", "val_ssim", *SELF_SUPERVISED_SCORES)


def score_of(objective: str) -> str:
    """The validation score of a self-supervised objective."""
    return next(k for k, v in SELF_SUPERVISED_SCORES.items() if v == objective)

@dataclass(frozen=True)
class TrainSettings:
    """Everything that shapes a training run besides the model and the data.

    Defaults are the reference's fine-tuning recipe; the named recipes are
    in :mod:`napari_cnnt.training.recipes`. ``patch_sizes`` lists
    ``(height, width)`` patches, one sampler each; ``batch_size`` counts
    patches per step over all processes. An epoch is one pass in which each
    sample gives every patch size ``patches_per_sample`` patches, or, with
    ``steps_per_epoch > 0``, that many steps of randomly drawn patches (a
    budget of steps, validated after every ``steps_per_epoch``).
    ``val_patches_per_sample`` is how many fixed patches each validation
    sample gives, of the smallest and of the largest training size, or of
    ``val_patch_size`` when given. ``clip_grad_norm <= 0`` turns clipping
    off; ``no_w_decay`` exempts biases and norm weights from weight decay.
    ``lsuv`` initialises the weights before training (for training from
    scratch). ``scheduler="WarmupCosine"`` rises linearly over the first
    ``warmup`` fraction of all steps, then follows a cosine to 1 % of
    ``lr``. The weights kept are those with the best ``select`` metric
    (the starting weights among them); ``patience > 0`` ends training after
    that many epochs without improvement. ``augment`` names the random
    changes made to training patches (:data:`~napari_cnnt.training.data.AUGMENTATIONS`).
    ``objective`` is how patches of samples without truth are learnt from:
    ``"interlaced"``, every other frame predicting the frames in between
    (:mod:`~napari_cnnt.training.interlace`; ``motion="flow"`` moves the
    neighbours onto the frame along the optical flow of the starting model's
    output first, ``"none"`` leaves them as they are), or
    ``"blind-spot"``, hiding
    the fraction ``blind_spot`` of the pixels of every frame
    (:mod:`~napari_cnnt.training.blindspot`; single-frame patches always do).
    Each validates by its own loss, which needs no truth
    (``select="val_interlaced_loss"`` or ``"val_masked_loss"``).
    ``min_gain`` is how much better than the starting weights' score, as a
    fraction of it, an epoch must validate to replace them: for a
    self-supervised score, which is mostly the noise itself, a change within
    its noise says nothing.
    """

    epochs: int = 30
    lr: float = 2.5e-5
    loss: tuple[str, ...] = ("ssim", "mse")
    loss_weights: tuple[float, ...] = (1.0, 0.1)
    patch_sizes: tuple[tuple[int, int], ...] = ((128, 128), (160, 160))
    time: int = 16
    batch_size: int = 8
    patches_per_sample: int = 1
    val_patches_per_sample: int = 2
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    no_w_decay: bool = False
    clip_grad_norm: float = 1.0
    scheduler: str = "ReduceLROnPlateau"
    value_thres: float = VALUE_THRES
    area_thres: float = AREA_THRES
    lsuv: bool = False
    seed: int = 0
    steps_per_epoch: int = 0
    warmup: float = 0.0
    patience: int = 0
    select: str = "val_loss"
    augment: tuple[str, ...] = ("flip",)
    val_patch_size: tuple[int, int] | None = None
    objective: str = "interlaced"
    motion: str = "flow"
    blind_spot: float = 0.02
    min_gain: float = 0.0

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        fix("loss", (self.loss,) if isinstance(self.loss, str) else tuple(self.loss))
        fix("loss_weights", tuple(float(w) for w in self.loss_weights))
        fix("patch_sizes", tuple(patch_sizes_of(self.patch_sizes)))
        fix("betas", tuple(float(b) for b in self.betas))
        fix("augment", (self.augment,) if isinstance(self.augment, str) else tuple(self.augment))
        if self.val_patch_size is not None:
            fix("val_patch_size", patch_sizes_of([self.val_patch_size])[0])
        self._check_counts()
        self._check_choices()
        self._check_numbers()

    def _check_counts(self) -> None:

        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in ("epochs", "time", "batch_size", "patches_per_sample", "val_patches_per_sample"):
            positive_int(name)
        for name in ("steps_per_epoch", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer (0: off), got {v!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def _check_choices(self) -> None:
        CombinedLoss(self.loss, self.loss_weights)  # checks names and weights
        if self.select not in SELECT:
            raise ValueError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if SELF_SUPERVISED_SCORES.get(self.select, self.objective) != self.objective:
            raise ValueError(f"select={self.select} scores the {SELF_SUPERVISED_SCORES[self.select]} objective; "
                             f"with objective={self.objective!r} select {score_of(self.objective)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")

    def _check_numbers(self) -> None:
        if not (isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 1):
            raise ValueError(f"warmup must be a fraction of the steps in [0, 1), got {self.warmup!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and 0 < self.lr < 1):
            raise ValueError(f"lr must be a finite learning rate in (0, 1), got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and non-negative, got {self.weight_decay}")
        if not math.isfinite(self.clip_grad_norm):
            raise ValueError(f"clip_grad_norm must be finite (<= 0 turns clipping off), got {self.clip_grad_norm}")
        if not (isinstance(self.min_gain, (int, float)) and 0 <= self.min_gain < 1):
            raise ValueError(f"min_gain must be a fraction in [0, 1), got {self.min_gain!r}")
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {', '.join(MOTIONS)}, got {self.motion!r}")
        if not (isinstance(self.blind_spot, (int, float)) and 0 < self.blind_spot <= 0.25):
            raise ValueError(f"blind_spot must be a fraction of the pixels in (0, 0.25], got {self.blind_spot!r}")
        for name in ("value_thres", "area_thres"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def check_model(self, config: CNNTConfig) -> None:
        """Patch sizes the model cannot take are refused before any work is done."""
        sizes = self.patch_sizes + ((self.val_patch_size,) if self.val_patch_size else ())
        for h, w in sizes:
            config.check_frame_size(h, w, "patch size" if (h, w) in self.patch_sizes else "validation patch size")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_sizes"] = [list(s) for s in self.patch_sizes]
        d["val_patch_size"] = list(self.val_patch_size) if self.val_patch_size else None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def total_steps(self) -> int | None:
        """Optimiser steps of the whole run when known before it starts (a budget of steps)."""
        return self.epochs * self.steps_per_epoch if self.steps_per_epoch else None

    def improves(self, score: float, best: float, over_start: bool = False) -> bool:
        """Whether ``score`` of the ``select`` metric beats ``best``; to replace the starting weights
        (``over_start``) it must beat them by ``min_gain``, a fraction of their score."""
        margin = self.min_gain * abs(best) if over_start and math.isfinite(best) else 0.0
        return score > best + margin if SELECT[self.select] else score < best - margin
