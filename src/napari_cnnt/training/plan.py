"""Before a run starts: settings fitted to the data and the machine, a memory estimate, and a time estimate.

:func:`plan_run` turns a recipe and the settings a caller gave into the
settings a run will use:

- settings the recipe leaves to the data (``patch_sizes``, ``time``,
  ``val_patch_size``) are fitted to the samples: the largest multiple of
  the model's size multiple that no sample needs padding for, and no more
  frames than the shortest stack;
- fixed recipe values larger than every sample are shrunk to the largest
  sample, with a note;
- values the caller gave that cannot work are refused with a
  :class:`SettingError` naming the setting: a patch larger than every
  sample, a time window longer than every stack, a run whose estimated
  peak memory exceeds what the machine has available;
- the batch size, where the recipe leaves it open, is lowered until a step
  fits in half the available memory;
- a recipe with a time budget (``Recipe.minutes``) runs fewer epochs on a
  machine too slow for all of them in that time (:func:`fit_to_time`),
  unless the caller gave ``epochs``.

Peak memory of a training step (:func:`step_bytes`) follows a rule measured
with ``benchmarks/bench_finetune.py --measure-memory``: float values per
input voxel, proportional to the ones ``denoise`` uses to size its tiles
(``inference._floats_per_voxel``), times the batch. The time estimate
(:func:`time_per_step`) times one real training step after a warm-up one.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import TrainingSettingsError
from . import interlace
from .data import Sample
from .recipes import Recipe
from .settings import SELF_SUPERVISED_SCORES, TrainSettings, score_of

# Peak memory of one training step (forward, float32 loss, backward, AdamW) in
# float32 values per input voxel, as a multiple of what inference needs
# (inference._floats_per_voxel), measured on the CPU for the "small" and
# "reference" presets: float32 and the bfloat16 fast path.
TRAIN_MEMORY_FACTOR = {False: 3.6, True: 2.1}
# Weights, gradients and AdamW's two moments, in float32 values per parameter,
# plus what the process holds besides (torch, the samples): a constant.
PARAMETER_FLOATS = 4
BASE_BYTES = 400 << 20
# A step may use this share of the available memory; auto batch sizes aim at half of it.
MEMORY_SHARE = 0.9


class SettingError(TrainingSettingsError):
    """A setting that cannot work with these data or on this machine.

    ``setting`` is the :class:`TrainSettings` field to change; front ends
    name it their own way with :meth:`message`.
    """

    def __init__(self, setting: str, text: str):
        self.setting = setting
        self.text = text
        super().__init__(text.format(setting=setting))

    def message(self, names: Mapping[str, str]) -> str:
        """The sentence with the setting called by ``names[setting]`` (e.g. a command-line flag)."""
        return self.text.format(setting=names.get(self.setting, self.setting))


@dataclass(frozen=True)
class Estimate:
    """What a run will need: peak memory of a step, the memory available, optimiser steps and,
    when timed, seconds per step."""

    peak_bytes: int
    available_bytes: int
    steps: int | None
    seconds_per_step: float | None = None
    validation_seconds: float = 0.0

    @property
    def seconds(self) -> float | None:
        """Seconds the whole run takes (validation included), when known."""
        if self.seconds_per_step is None or self.steps is None:
            return None
        return self.steps * self.seconds_per_step + self.validation_seconds

    def __str__(self) -> str:
        memory = f"peak memory about {_gb(self.peak_bytes)} of {_gb(self.available_bytes)} available"
        if self.seconds is None:
            return memory
        return f"about {minutes_text(self.seconds)} on this machine, {memory}"


def minutes_text(seconds: float) -> str:
    """``"6 min"``, ``"40 s"``, ``"1 h 20 min"``: a duration as a person would say it."""
    if seconds < 60:
        return f"{max(1, round(seconds / 10) * 10)} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB"


@dataclass
class Plan:
    """The settings a run will use, what was chosen or changed (``notes``), the estimate and the
    name of the recipe they come from."""

    settings: TrainSettings
    estimate: Estimate
    notes: list[str] = field(default_factory=list)
    recipe: str = ""
    frames: int = 0  # frames a training step's patches give the network (0: settings.time)


# ----------------------------------------------------------------------------- memory
def step_bytes(config: Any, batch: int, time_window: int, height: int, width: int, fast: bool,
               parameters: int = 0) -> int:
    """Estimated peak memory of one training step on ``batch`` patches of a model with
    ``parameters`` weights, in bytes."""
    from ..inference import _floats_per_voxel

    voxels = batch * time_window * height * width
    activations = TRAIN_MEMORY_FACTOR[bool(fast)] * _floats_per_voxel(config) * voxels * 4
    return int(activations + PARAMETER_FLOATS * 4 * parameters + BASE_BYTES)


def available_memory(device: Any) -> int:
    """Bytes the device can still give to training."""
    from ..inference import _free_memory

    return int(_free_memory(device))


def settings_bytes(config: Any, s: TrainSettings, fast: bool, parameters: int = 0) -> int:
    """Peak memory of a step at the run's largest patch."""
    h, w = max(s.patch_sizes, key=lambda hw: hw[0] * hw[1])
    return step_bytes(config, s.batch_size, s.time, h, w, fast, parameters)


# ----------------------------------------------------------------------------- fitting
def _round_down(n: int, m: int) -> int:
    return max(m, n // m * m)


def _fit_edge(limit: int, edge: int, m: int) -> int:
    """The largest multiple of ``m`` up to ``edge`` and up to ``limit`` (at least ``m``)."""
    return _round_down(min(edge, limit), m)


def _shapes(samples: Sequence[Sample]) -> np.ndarray:
    return np.array([s.shape for s in samples])


def fit_to_data(
    recipe: Recipe,
    given: Mapping[str, Any],
    config: Any,
    train: Sequence[Sample],
    val: Sequence[Sample],
) -> tuple[TrainSettings, list[str]]:
    """The recipe with ``given`` settings, its automatic and fixed values fitted to the samples.

    Raises :class:`SettingError` for given settings that fit no sample.
    """
    settings = recipe.with_options(**given)
    m = config.size_multiple
    shapes = _shapes(train)
    notes: list[str] = []
    largest_t, largest_h, largest_w = shapes.max(axis=0)
    smallest_t, smallest_h, smallest_w = shapes.min(axis=0)
    changes: dict[str, Any] = {}

    # Time window.
    if "time" in given:
        if settings.time > largest_t:
            raise SettingError("time", f"a time window of {settings.time} frames is longer than every training "
                                       f"stack (the longest has {largest_t}); lower {{setting}} to at most "
                                       f"{largest_t}")
    elif "time" in recipe.auto:
        changes["time"] = int(min(settings.time, smallest_t))
    elif settings.time > largest_t:
        changes["time"] = int(largest_t)
        notes.append(f"time window {settings.time} -> {largest_t} frames: no stack is longer")

    _fit_objective(settings, given, train, changes, notes)

    # Patch sizes.
    sizes = list(settings.patch_sizes)
    if "patch_sizes" in given:
        for h, w in sizes:
            if not any(h <= H and w <= W for H, W in shapes[:, 1:]):
                raise SettingError("patch_sizes", f"a patch of {h} x {w} is larger than every training sample (the "
                                                  f"largest is {largest_h} x {largest_w}); lower {{setting}} to at "
                                                  f"most {_round_down(largest_h, m)} x {_round_down(largest_w, m)}")
    elif "patch_sizes" in recipe.auto:
        fitted = [(_fit_edge(smallest_h, h, m), _fit_edge(smallest_w, w, m)) for h, w in sizes]
        if "rot90" in settings.augment:  # quarter turns need square patches
            fitted = [(min(h, w), min(h, w)) for h, w in fitted]
        changes["patch_sizes"] = tuple(dict.fromkeys(fitted))
    else:
        fitted = [(min(h, _round_down(largest_h, m)), min(w, _round_down(largest_w, m))) for h, w in sizes]
        fitted = list(dict.fromkeys(fitted))
        if fitted != sizes:
            changes["patch_sizes"] = tuple(fitted)
            notes.append(f"patch sizes {_sizes_text(sizes)} -> {_sizes_text(fitted)}: no sample is larger")

    # Validation patches: the training patch, no larger than the validation samples.
    if val and "val_patch_size" in recipe.auto and "val_patch_size" not in given:
        vh, vw = _shapes(val)[:, 1:].min(axis=0)
        h, w = max(changes.get("patch_sizes", sizes), key=lambda hw: hw[0] * hw[1])
        changes["val_patch_size"] = (min(h, _round_down(int(vh), m)), min(w, _round_down(int(vw), m)))
    return replace(settings, **changes) if changes else settings, notes


def _fit_objective(settings: TrainSettings, given: Mapping[str, Any], train: Sequence[Sample],
                   changes: dict[str, Any], notes: list[str]) -> None:
    """The time window and the objective for noisy stacks, added to ``changes``."""
    # The interlaced objective must not pad a noisy stack in time: a repeated frame would be both
    # input and target.
    noisy_t = [t.shape[0] for t in train if not t.has_truth]
    time = changes.get("time", settings.time)
    if settings.objective == "interlaced" and noisy_t and min(noisy_t) < time:
        if "time" in given:
            raise SettingError("time", f"a time window of {time} frames is longer than the shortest noisy stack "
                                       f"({min(noisy_t)} frames), which the interlaced objective cannot pad; "
                                       f"lower {{setting}} to at most {min(noisy_t)}")
        changes["time"] = int(min(noisy_t))
        notes.append(f"time window {time} -> {min(noisy_t)} frames: the shortest noisy stack")

    # Single frames have no neighbours in time: they hide pixels instead.
    if changes.get("time", settings.time) == 1 and settings.objective == "interlaced":
        changes["objective"] = "blind-spot"
        if settings.select in SELF_SUPERVISED_SCORES:
            changes["select"] = score_of("blind-spot")
        if not all(t.has_truth for t in train):
            notes.append("objective interlaced -> blind-spot: single frames have no neighbours in time")


def _sizes_text(sizes: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{h} x {w}" for h, w in sizes)


def fit_to_memory(
    recipe: Recipe, given: Mapping[str, Any], settings: TrainSettings, config: Any, fast: bool, available: int,
    parameters: int = 0,
) -> tuple[TrainSettings, list[str]]:
    """Lower the batch size (where the recipe leaves it open) until a step fits in half of
    ``available``; refuse a run that does not fit at all, naming the setting to lower."""
    notes: list[str] = []
    auto_batch = "batch_size" in recipe.auto and "batch_size" not in given
    fixed_batch = "batch_size" not in recipe.auto and "batch_size" not in given
    need = settings_bytes(config, settings, fast, parameters)
    if auto_batch or fixed_batch:
        budget = available // 2 if auto_batch else int(available * MEMORY_SHARE)
        batch = settings.batch_size
        while batch > 1 and settings_bytes(config, replace(settings, batch_size=batch), fast, parameters) > budget:
            batch -= 1
        if batch != settings.batch_size:
            if fixed_batch:
                notes.append(f"batch size {settings.batch_size} -> {batch}: a larger batch would not fit in the "
                             f"{_gb(available)} of memory available")
            settings = replace(settings, batch_size=batch)
            need = settings_bytes(config, settings, fast, parameters)
    if need > available * MEMORY_SHARE:
        h, w = max(settings.patch_sizes, key=lambda hw: hw[0] * hw[1])
        if settings.batch_size > 1:
            setting = "batch_size"
        elif "patch_sizes" in given or min(h, w) > config.size_multiple:
            setting = "patch_sizes"
        else:
            setting = "time"
        raise SettingError(setting, f"a training step of {settings.batch_size} x {settings.time} x {h} x {w} would "
                                    f"need about {_gb(need)} of memory, more than the {_gb(available)} available; "
                                    f"lower {{setting}}")
    return settings, notes


def plan_run(
    recipe: Recipe,
    given: Mapping[str, Any],
    config: Any,
    train: Sequence[Sample],
    val: Sequence[Sample],
    runtime: Any,
    parameters: int = 0,
    available: int | None = None,
) -> Plan:
    """The settings a run of ``recipe`` with the caller's ``given`` settings will use on ``runtime``
    (a model of ``parameters`` weights; ``available``: bytes of memory, default what the device has free)."""
    settings, notes = fit_to_data(recipe, given, config, train, val)
    settings.check_model(config)
    available = available_memory(runtime.device) if available is None else int(available)
    settings, more = fit_to_memory(recipe, given, settings, config, runtime.fast, available, parameters)
    estimate = Estimate(settings_bytes(config, settings, runtime.fast, parameters), available,
                        _steps(settings, len(train)))
    return Plan(settings, estimate, notes + more, frames=frames_per_step(settings, train))


def frames_per_step(s: TrainSettings, train: Sequence[Sample]) -> int:
    """Frames per patch the network sees in a training step: half of them when noisy stacks learn
    by the interlaced objective (the whole batch then takes every other frame)."""
    if s.objective == "interlaced" and s.time > 1 and not all(t.has_truth for t in train):
        return interlace.frames_seen(s.time)
    return s.time


def _steps(s: TrainSettings, n_train: int) -> int:
    from .data import steps_per_epoch

    per_epoch = s.steps_per_epoch or steps_per_epoch(n_train, len(s.patch_sizes), s.batch_size, s.patches_per_sample)
    return s.epochs * per_epoch


# ----------------------------------------------------------------------------- time
_STEP_TIMES: dict[tuple, float] = {}


def time_per_step(model: Any, settings: TrainSettings, runtime: Any, repeats: int = 1, frames: int = 0) -> float:
    """Seconds of one optimiser step at the run's largest patch (of ``frames`` frames, by default
    ``settings.time``): the fastest of ``repeats`` steps
    after a warm-up step (the first bf16 step on a CPU also compiles its kernels and can take
    several times longer). Measured once per model shape, step shape and runtime in a session.

    Runs on a copy of ``model`` with random data; the caller's model and RNG are untouched.
    """
    import torch

    from ..losses import CombinedLoss

    h, w = max(settings.patch_sizes, key=lambda hw: hw[0] * hw[1])
    frames = frames or settings.time
    key = (model.config.to_json(), settings.batch_size, frames, h, w, str(runtime.device), runtime.fast,
           settings.loss, repeats)
    if key in _STEP_TIMES:
        return _STEP_TIMES[key]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = runtime.prepare(copy.deepcopy(model).train())
        opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
        loss_fn = CombinedLoss(settings.loss, settings.loss_weights)
        x = torch.rand(settings.batch_size, frames, 1, h, w, device=runtime.device)
        best = math.inf
        for i in range(1 + repeats):
            t0 = time.perf_counter()
            with runtime.autocast():
                out = net(x)
            loss = loss_fn(out.float(), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if runtime.device.type == "cuda":
                torch.cuda.synchronize(runtime.device)
            if i:
                best = min(best, time.perf_counter() - t0)
    _STEP_TIMES[key] = best
    return best


def _validation_seconds(step: float, s: TrainSettings, n_val_patches: int) -> float:
    """One validation: forward passes only, about a third of a step per patch."""
    return n_val_patches * step / (3 * s.batch_size)


def fit_to_time(
    recipe: Recipe, given: Mapping[str, Any], plan: Plan, model: Any, runtime: Any, n_val_patches: int,
) -> Plan:
    """For a recipe with a time budget, time one step and lower the epochs to fit in the budget."""
    s = plan.settings
    if not (recipe.minutes and "epochs" not in given and s.steps_per_epoch):
        return plan
    step = time_per_step(model, s, runtime, frames=plan.frames)
    notes = list(plan.notes)
    per_epoch = s.steps_per_epoch * step + _validation_seconds(step, s, n_val_patches)
    epochs = int(min(s.epochs, max(recipe.min_epochs, (recipe.minutes * 60) // per_epoch)))
    if epochs < s.epochs:
        notes.append(f"{s.epochs} -> {epochs} epochs of {s.steps_per_epoch} steps, so that training takes "
                     f"about {minutes_text(epochs * per_epoch)} on this machine (the {recipe.name} recipe "
                     f"allows {minutes_text(recipe.minutes * 60)})")
        s = replace(s, epochs=epochs)
    n_train = plan.estimate.steps // plan.settings.epochs if plan.estimate.steps else 0
    estimate = replace(plan.estimate, steps=s.epochs * n_train if n_train else plan.estimate.steps,
                       seconds_per_step=step,
                       validation_seconds=(s.epochs + 1) * _validation_seconds(step, s, n_val_patches))
    return replace(plan, settings=s, estimate=estimate, notes=notes)


def estimate_time(model: Any, plan: Plan, runtime: Any, n_val_patches: int = 0) -> Estimate:
    """``plan.estimate`` with the time a run takes on this machine, from a timed step
    (validation included: ``n_val_patches`` forward passes before training and after every epoch)."""
    if plan.estimate.seconds is not None:
        return plan.estimate
    s = plan.settings
    step = time_per_step(model, s, runtime, frames=plan.frames)
    validation = (s.epochs + 1) * _validation_seconds(step, s, n_val_patches)
    return replace(plan.estimate, seconds_per_step=step, validation_seconds=validation)


__all__ = ["Estimate", "Plan", "SettingError", "available_memory", "estimate_time", "fit_to_data",
           "fit_to_memory", "fit_to_time", "minutes_text", "plan_run", "step_bytes", "time_per_step"]
