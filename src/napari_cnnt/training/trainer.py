"""The training engine shared by ``finetune``, ``train``, the command line and the widget.

It follows the reference recipe (``docs/cnnt.md`` section 8): batches of
several patch sizes interleaved at random, AdamW, gradient clipping, a
learning-rate schedule, LSUV when starting from scratch, and the weights
with the best validation loss kept. On top of that it

- runs the network in bfloat16 where the hardware supports it (the
  runtime's fast path) while weights, gradients and losses stay float32;
- can be stopped between any two steps and still returns the best weights;
- saves a checkpoint atomically after every epoch and resumes from it;
- runs data-parallel under ``torchrun``, each process taking a share of
  every batch;
- trains on noisy stacks without truth with the blind-spot objective
  (:mod:`~napari_cnnt.training.blindspot`), alone or mixed with pairs, and
  validates them by the masked-pixel loss.

Randomness is derived from ``(seed, epoch)``, so a resumed run draws the same
patches as an uninterrupted one and a run's outcome does not depend on the
number of processes it is split over.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..control import check_progress, renamed, stop_requested
from ..losses import CombinedLoss, psnr, ssim
from ..metrics import truth_range
from ..model.denoiser import CNNTDenoiser
from ..runtime import Runtime
from . import distributed, interlace
from .blindspot import VISIBLE, draw_mask, hide, masked_loss
from .checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointMismatch,
    read_training_checkpoint,
    save_training_checkpoint,
)
from .data import (
    PatchSampler,
    Sample,
    Split,
    budget_schedule,
    epoch_schedule,
    steps_per_epoch,
)
from .history import History, Progress
from .lsuv import lsuv_init
from .optim import make_optimizer, make_scheduler
from .settings import NEEDS_TRUTH, PER_STEP, SELF_SUPERVISED_SCORES, VALIDATION_KEYS, TrainSettings, score_of


# ----------------------------------------------------------------------------- helpers
def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _data_fingerprint(samples: list[Sample]) -> list[list[Any]]:
    return [[s.name, list(s.shape)] for s in samples]


def metrics(
    output: torch.Tensor, target: torch.Tensor, loss_fn: CombinedLoss, peak: float
) -> tuple[float, float, float]:
    """Loss, PSNR and SSIM of one ``[1, T, 1, H, W]`` prediction.

    PSNR follows napari-cnnt's convention (``napari_cnnt.metrics``): the output
    as it is, ``peak`` the range of the whole truth stack the target was cut
    from. SSIM is measured on the model's [0, 1] scale, the output clipped to it.
    """
    output, target = output.float(), target.float()
    value = psnr(output, target, data_range=peak).item() if peak > 0 else math.nan
    return loss_fn(output, target).item(), value, ssim(output.clamp(0, 1), target).item()


# ----------------------------------------------------------------------------- engine
class Trainer:
    """Trains a copy of ``model`` on ``train`` samples, validating on ``val`` samples.

    ``progress`` is called with a :class:`Progress` after every step and epoch
    (on rank 0 only); ``stop`` is a ``threading.Event`` or a callable returning
    True: training ends before the next step (:mod:`napari_cnnt.control`). ``checkpoint`` is a file that is written at
    the start and after every epoch; when it exists already, training
    resumes from it. The user's model is never modified.
    """

    def __init__(
        self,
        model: CNNTDenoiser,
        train: list[Sample],
        val: list[Sample],
        settings: TrainSettings,
        *,
        split: Split | None = None,
        device: str | torch.device | None = None,
        fast: bool | None = None,
        progress: Callable[[Progress], Any] | None = None,
        stop: Any = None,
        checkpoint: str | os.PathLike | None = None,
        callback: Callable[[Progress], Any] | None = None,
    ):
        if not isinstance(model, CNNTDenoiser):
            raise TypeError(f"expected a CNNTDenoiser, got {type(model).__name__}")
        if not train:
            raise ValueError("no training samples")
        progress = check_progress(renamed(progress, callback, "progress", "callback", "Trainer"))
        stop_check = stop_requested(stop)
        settings.check_model(model.config)
        self.ranks = distributed.current()
        if settings.batch_size < self.ranks.world_size:
            raise ValueError(
                f"batch_size={settings.batch_size} is smaller than the {self.ranks.world_size} processes "
                "sharing each batch"
            )
        if settings.select in NEEDS_TRUTH and val and not all(v.has_truth for v in val):
            raise ValueError(
                f"validation by {settings.select} needs a clean image for every validation sample; without "
                f"truth select {score_of(settings.objective)} (the self-supervised recipe does)"
            )
        if settings.select == score_of("interlaced") and val and all(v.has_truth for v in val):
            raise ValueError(
                f"validation by {settings.select} scores noisy stacks without truth, and every validation "
                "sample has a clean image; select val_psnr"
            )
        self.base = model
        self.settings = settings
        self.split = split or Split([s.name for s in train], [s.name for s in val])
        self.runtime = Runtime.create(device, fast)
        train, val = self._with_targets(train), self._with_targets(val)
        self.train_samples, self.val_samples = list(train), list(val)
        self.truth = np.array([s.has_truth for s in self.train_samples])
        self.progress = progress
        self.stop_requested = stop_check
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.samplers = [
            PatchSampler(train, settings.time, h, w, settings.value_thres, settings.area_thres, settings.augment)
            for h, w in settings.patch_sizes
        ]
        self.steps = settings.steps_per_epoch or steps_per_epoch(
            len(train), len(self.samplers), settings.batch_size, settings.patches_per_sample)
        self._clock: list[float] = []  # [start, steps timed] of this run's training

    def _with_targets(self, samples: list[Sample]) -> list[Sample]:
        """The samples, those without truth given their interlaced targets when they learn by that
        objective (:func:`~napari_cnnt.training.interlace.between_frames`, aligned along the
        optical flow of the starting model's output unless ``motion`` is ``"none"``)."""
        motion = self.settings.motion

        def targets(s: Sample) -> Sample:
            if s.has_truth or not self._interlaced(s.shape[0]):
                return s
            start = s.noisy
            if motion != "none":
                from ..inference import denoise

                start = denoise(s.noisy, self.base, normalization="none", device=self.runtime).astype(np.float32)
            return dataclasses.replace(s, between=interlace.between_frames(s.noisy, start, motion).astype(np.float32))

        return [targets(s) for s in samples]

    # ------------------------------------------------------------------ API
    def run(self) -> tuple[CNNTDenoiser, History]:
        """Train; returns the model with the best weights (CPU, eval mode) and the history."""
        dev = self.runtime.device
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.runtime.precision():
            return self._run()

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed: everything but the number of epochs,
        which may grow, unless the one-cycle schedule was planned for it."""
        s = self.settings.to_dict()
        if s["scheduler"] not in PER_STEP:
            s.pop("epochs")
        return {
            "config": self.base.config.to_dict(),
            "settings": s,
            "train": _data_fingerprint(self.train_samples),
            "val": _data_fingerprint(self.val_samples),
        }

    # ------------------------------------------------------------------ internals
    def _run(self) -> tuple[CNNTDenoiser, History]:
        s, rt = self.settings, self.runtime
        model = copy.deepcopy(self.base).cpu()
        resumed = self._read_checkpoint()
        history = History(split=self.split, metric=s.select)
        if resumed is not None:
            model.load_state_dict(resumed["model"])
            history = History.from_dict(json.loads(resumed["progress"]))
            history.stopped = False
        model = rt.prepare(model)
        if resumed is None and s.lsuv:
            torch.manual_seed(s.seed)  # dropout during LSUV's forward passes
            x, _ = self.samplers[0].batch(
                np.arange(s.batch_size) % len(self.train_samples), np.random.default_rng([s.seed, 0])
            )
            lsuv_init(model, torch.from_numpy(x).to(rt.device), generator=torch.Generator().manual_seed(s.seed))
        net = distributed.wrap(model, self.ranks, rt.device)
        optimizer = make_optimizer(model, s)
        scheduler = make_scheduler(optimizer, s, s.epochs * self.steps)
        val_parts = self._validation_patches()
        loss_fn = CombinedLoss(s.loss, s.loss_weights)

        if resumed is None:
            best_state = _cpu_state(model)
            if val_parts:
                history.initial = self._validate(model, val_parts, loss_fn)
                history.best_score = history.initial[s.select]
            self._save(model, best_state, optimizer, scheduler, history)
        else:
            best_state = resumed["best"]
            optimizer.load_state_dict(resumed["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(resumed["scheduler"])

        self._clock = [time.perf_counter(), 0]
        for epoch in range(len(history) + 1, s.epochs + 1):
            if val_parts and s.patience and len(history) - history.last_progress(s.improves) >= s.patience:
                history.early = True  # also when a resumed run had already stopped improving
                break
            t0 = time.perf_counter()
            train_loss, lr, stopped = self._train_epoch(net, model, optimizer, scheduler, loss_fn, epoch)
            if stopped:
                history.stopped = True
                break
            val = self._validate(model, val_parts, loss_fn) if val_parts else {
                key: math.nan for key in VALIDATION_KEYS}
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                plateau = next((val[k] for k in ("val_loss", *SELF_SUPERVISED_SCORES) if not math.isnan(val[k])),
                               math.nan)
                scheduler.step(plateau if val_parts else train_loss)
            elif scheduler is not None and s.scheduler not in PER_STEP:
                scheduler.step()
            record = {"epoch": epoch, "train_loss": train_loss, **val, "lr": lr,
                      "seconds": time.perf_counter() - t0}
            history.records.append(record)
            if not val_parts or s.improves(val[s.select], history.best_score, over_start=history.best_epoch == 0):
                history.best_epoch, history.best_score = epoch, (val[s.select] if val_parts else train_loss)
                best_state = _cpu_state(model)
            self._save(model, best_state, optimizer, scheduler, history)
            self._report(Progress("epoch", epoch, s.epochs, self.steps, self.steps, train_loss, lr, record, history,
                                  *self._pace(epoch, self.steps)))

        final = copy.deepcopy(self.base).cpu()
        final.load_state_dict(best_state)
        return final.eval(), history

    def _train_epoch(self, net, model, optimizer, scheduler, loss_fn, epoch) -> tuple[float, float, bool]:
        s, rt, ranks = self.settings, self.runtime, self.ranks
        rng = np.random.default_rng([s.seed, epoch])
        torch.manual_seed(_epoch_seed(s.seed, epoch, ranks.rank))
        if s.steps_per_epoch:
            schedule = budget_schedule(len(self.train_samples), len(self.samplers), s.batch_size,
                                       s.steps_per_epoch, rng)
        else:
            schedule = epoch_schedule(len(self.train_samples), len(self.samplers), s.batch_size,
                                      s.patches_per_sample, rng)
        net.train()
        total = 0.0
        lr = optimizer.param_groups[0]["lr"]
        for step, (size, indices) in enumerate(schedule, start=1):
            if self._should_stop():
                return math.nan, lr, True
            noisy, clean = self.samplers[size].batch(indices, rng)
            blind = ~self.truth[indices]
            # Drawn for the whole batch before it is shared, so that they do not depend on the processes.
            mask, scored = None, 0
            if blind.any() and self._interlaced(noisy.shape[1]):
                noisy, clean = interlace.training_batch(noisy, clean, int(rng.integers(0, 2)))
                scored = int(blind.sum()) * int(np.prod(clean.shape[1:]))
            elif blind.any():
                mask = draw_mask(noisy.shape, s.blind_spot, rng)
                mask[~blind] = VISIBLE
                scored = int((mask >= 0).sum())
            share = slice(ranks.rank, None, ranks.world_size)
            x = torch.from_numpy(noisy[share]).to(rt.device, non_blocking=True)
            y = torch.from_numpy(clean[share]).to(rt.device, non_blocking=True)
            loss = self._loss(net, x, y, None if mask is None else torch.from_numpy(mask[share]).to(rt.device),
                              blind, share, scored, loss_fn)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training diverged: the loss is {value} at epoch {epoch}, step {step}; "
                    "try a lower learning rate (the last checkpoint holds the last good epoch)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.clip_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            if s.scheduler in PER_STEP:
                scheduler.step()
            total += value
            self._clock[1] += 1
            self._report(Progress("step", epoch, s.epochs, step, len(schedule), value, lr, None, None,
                                  *self._pace(epoch, step)))
        mean = distributed.sum_across([total / len(schedule)], ranks, rt.device)[0] / ranks.world_size
        return mean, lr, False

    def _loss(self, net, x, y, mask, blind, share, scored, loss_fn) -> torch.Tensor:
        """The supervised loss on this process's patches with truth and the self-supervised one on
        those without, weighted by their share of the batch (``blind``: which patches of the whole
        batch have no truth). The self-supervised loss is the squared error against the noisy
        targets at the ``scored`` pixels of the whole batch: the hidden ones where ``mask`` is
        given (blind-spot, their values replaced in the input), else every pixel of the targets of
        the patches without truth (interlaced)."""
        rt = self.runtime
        if mask is not None:
            x = hide(x, mask)
        with rt.autocast():
            out = net(x).float()
        if not blind.any():
            return loss_fn(out, y)
        mine = blind[share]
        # Divided by the whole batch's scored pixels per process: see masked_loss.
        per_process = scored / self.ranks.world_size
        if mask is not None:
            loss = masked_loss(out, y, mask, per_process)
        else:
            picked = torch.from_numpy(mine).to(out.device)
            loss = (out[picked] - y[picked]).square().sum() / per_process
        loss = loss * (blind.sum() / len(blind))
        if not mine.all():
            sup = torch.from_numpy(~mine).to(out.device)
            loss = loss + loss_fn(out[sup], y[sup]) * ((~blind).sum() / len(blind))
        return loss

    def _interlaced(self, frames: int) -> bool:
        """Whether patches of ``frames`` frames without truth learn by the interlaced objective
        (single frames have no neighbours in time: they hide pixels)."""
        return self.settings.objective == "interlaced" and frames > 1

    def _pace(self, epoch: int, step: int) -> tuple[float, float | None]:
        """Seconds trained in this run, and an estimate of the seconds left (validation included)."""
        start, timed = self._clock
        elapsed = time.perf_counter() - start
        if timed == 0:
            return elapsed, None
        left = (self.settings.epochs - epoch) * self.steps + self.steps - step
        return elapsed, elapsed / timed * left

    def _validation_patches(self) -> list[dict[str, Any]]:
        """Fixed patches of ``val_patch_size``, or of the smallest and the largest patch size, this
        process's share: per size the inputs ``x``, targets ``y``, which have ``truth``, the PSNR
        peak of each (the truth range of the sample it was cut from) and, when the masked-pixel loss
        is measured, fixed ``mask`` s (drawn once, so every validation hides the same pixels)."""
        s = self.settings
        if not self.val_samples:
            return []
        sizes = sorted(set(s.patch_sizes), key=lambda hw: hw[0] * hw[1])
        chosen = [s.val_patch_size] if s.val_patch_size else [sizes[0], sizes[-1]]
        ranges = np.array([truth_range(v.clean) if v.has_truth else math.nan for v in self.val_samples])
        truth = np.array([v.has_truth for v in self.val_samples])
        masked = s.select in SELF_SUPERVISED_SCORES or not truth.all()
        parts = []
        for k, (h, w) in enumerate(dict.fromkeys(chosen)):
            sampler = PatchSampler(self.val_samples, s.time, h, w, s.value_thres, s.area_thres)
            x, y = sampler.fixed_patches(s.val_patches_per_sample, seed=[s.seed, 0, 1 + k])
            mask = None
            if masked and not self._interlaced(x.shape[1]):
                mask = draw_mask(x.shape, s.blind_spot, np.random.default_rng([s.seed, 0, 100 + k]))
            share = slice(self.ranks.rank, None, self.ranks.world_size)
            parts.append({
                "x": torch.from_numpy(x[share]), "y": torch.from_numpy(y[share]),
                "truth": np.repeat(truth, s.val_patches_per_sample)[share],  # fixed_patches' order
                "peaks": np.repeat(ranges, s.val_patches_per_sample)[share],
                "mask": None if mask is None else torch.from_numpy(mask[share]),
                "interlaced": masked and self._interlaced(x.shape[1]),
            })
        return parts

    @torch.no_grad()
    def _validate(self, model, parts, loss_fn) -> dict[str, float]:
        """Mean loss, PSNR and SSIM over the validation patches with truth, each patch weighing
        the same, and the masked-pixel loss over all of them (NaN where not measured)."""
        rt, bs = self.runtime, self.settings.batch_size
        model.eval()
        # loss, PSNR, SSIM, patches with truth; masked squared error, hidden pixels; interlaced ones
        sums = [0.0] * 8
        for part in parts:
            xs, ys, truth, peaks, masks = part["x"], part["y"], part["truth"], part["peaks"], part["mask"]
            for i in range(0, len(xs), bs):
                x, y = xs[i:i + bs].to(rt.device), ys[i:i + bs].to(rt.device)
                if truth[i:i + bs].any():
                    with rt.autocast():
                        out = model(x)
                    for j in np.flatnonzero(truth[i:i + bs]):
                        for k, value in enumerate(metrics(out[j:j + 1], y[j:j + 1], loss_fn, peaks[i + j])):
                            sums[k] += value
                        sums[3] += 1
                if masks is not None:
                    m = masks[i:i + bs].to(rt.device)
                    with rt.autocast():
                        out = model(hide(x, m))
                    count = float((m >= 0).sum())
                    sums[4] += masked_loss(out, x, m).item() * count  # against the noisy values, truth or not
                    sums[5] += count
                blind = torch.from_numpy(~truth[i:i + bs]).to(rt.device)
                if part["interlaced"] and blind.any():  # patches without truth, both parities
                    for parity in (0, 1):
                        seen = torch.from_numpy(interlace.input_frames(x.shape[1], parity)).to(rt.device)
                        with rt.autocast():
                            out = model(x[blind][:, seen])
                        target = y[blind][:, seen]
                        sums[6] += (out.float() - target).square().sum().item()
                        sums[7] += target.numel()
        loss, p, q, n, sq, hidden, isq, scored = distributed.sum_across(sums, self.ranks, rt.device)
        nan = math.nan
        return {"val_loss": loss / n if n else nan, "val_psnr": p / n if n else nan,
                "val_ssim": q / n if n else nan, "val_masked_loss": sq / hidden if hidden else nan,
                "val_interlaced_loss": isq / scored if scored else nan}

    def _should_stop(self) -> bool:
        flag = self.stop_requested()
        if self.ranks.distributed:
            return distributed.any_across(flag, self.ranks, self.runtime.device)
        return flag

    def _report(self, progress: Progress) -> None:
        if self.progress is not None and self.ranks.is_main:
            self.progress(progress)

    def _read_checkpoint(self) -> dict[str, Any] | None:
        if self.checkpoint is None or not self.checkpoint.exists():
            return None
        state = read_training_checkpoint(self.checkpoint)
        theirs, ours = json.loads(state["fingerprint"]), self.fingerprint()
        if isinstance(theirs.get("settings"), dict):  # settings added since the checkpoint was written
            defaults = TrainSettings().to_dict()
            theirs["settings"] = {**{k: defaults[k] for k in ours["settings"] if k != "epochs"}, **theirs["settings"]}
        differ = [k for k in ours if theirs.get(k) != ours[k]]
        if differ:
            raise CheckpointMismatch(
                f"{self.checkpoint}: belongs to another training run (its {', '.join(differ)} differ "
                "from this one); delete it or choose another checkpoint file"
            )
        return state

    def _save(self, model, best_state, optimizer, scheduler, history: History) -> None:
        if self.checkpoint is None or not self.ranks.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.base.config.to_json(),
            "normalization": json.dumps(self.base.normalization.to_dict()),
            "metadata": json.dumps(self.base.metadata, default=str),
            "fingerprint": json.dumps(self.fingerprint()),
            "progress": json.dumps(history.to_dict()),
            "model": _cpu_state(model),
            "best": best_state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
        }
        save_training_checkpoint(self.checkpoint, state)
