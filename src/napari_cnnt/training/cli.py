"""``napari-cnnt train`` and ``napari-cnnt finetune``.

Both accept the reference implementation's flag names, so its documented
command lines run with ``napari-cnnt train`` in place of ``python3 main.py``.
Defaults come from a named recipe (``napari_cnnt.training.recipes``):
``train`` has the reference's backbone recipe, ``finetune`` the few-sample
recipe (``--recipe reference``: the reference's fine-tuning recipe; noisy
stacks without clean images, ``--noisy``, default to the self-supervised
recipe), starting from the bundled model unless ``--load_path`` is given. Flags given on the
command line replace the recipe's values and are used as given.
Experiment-tracker flags are accepted and ignored with a warning; instead
there is a progress bar per epoch, a log line per epoch (also in
``--log_path``), a metrics CSV, and the final model in napari-cnnt's format.

Under ``torchrun --nproc_per_node N`` the same command trains data-parallel;
only rank 0 writes files. Ctrl-C (or SIGTERM) stops at the next step and
still writes the best model so far; run the same command again (same
``--run_name``) to resume from the checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import ImageFileError, InputError, TrainingSettingsError, UsageError
from ..io.atomic import check_output

TRACKER_FLAGS = ("project", "wandb_entity", "run_notes", "num_samples_wandb", "num_test_samples_wandb")
UNUSED_FLAGS = {
    "save_cycle": "the checkpoint is saved after every epoch",
    "test_image_path": "test images are not written",
}
MODEL_FLAGS = ("blocks", "blocks_per_set", "n_head", "kernel_size", "stride", "padding", "dropout_p",
               "norm_mode", "with_mixer", "no_residual")

# Each command's default recipe, and the recipes it offers.
# The recipes each command offers; its default is the API's (``train()``'s, ``finetune()``'s).
COMMAND_RECIPES = {"train": ("backbone", "reference", "few-sample"),
                   "finetune": ("few-sample", "self-supervised", "reference")}
# Command-line flags that set a TrainSettings field directly: flag -> field.
FLAG_SETTINGS = {
    "num_epochs": "epochs", "global_lr": "lr", "loss": "loss", "loss_weights": "loss_weights", "time": "time",
    "batch_size": "batch_size", "num_patches_per_train_sample": "patches_per_sample",
    "num_patches_per_val_sample": "val_patches_per_sample", "optim": "optimizer", "weight_decay": "weight_decay",
    "clip_grad_norm": "clip_grad_norm", "scheduler": "scheduler", "valu_thres": "value_thres",
    "area_thres": "area_thres", "seed": "seed", "steps_per_epoch": "steps_per_epoch", "patience": "patience",
}
# How a refused setting is called on the command line.
SETTING_FLAGS = {v: f"--{k}" for k, v in FLAG_SETTINGS.items()} | {
    "patch_sizes": "--height/--width", "betas": "--beta1/--beta2", "val_patch_size": "--height/--width",
    "blind_spot": "--blind_spot", "objective": "--objective", "motion": "--motion",
}

log = logging.getLogger("napari_cnnt.training")


def _flag_names(text: str) -> str:
    """A settings message with the setting called by its command-line flag where it starts the message."""
    for field, flag in SETTING_FLAGS.items():
        if text.startswith(f"{field} "):
            return flag + text[len(field):]
    return text


def add_train(subparsers: Any) -> None:
    _add(subparsers, "train", "train a CNNT model (from scratch, or from --load_path)",
         "Train a CNNT denoiser on CNNT HDF5 files, the reference implementation's way. From scratch "
         "the weights are LSUV-initialised; with --load_path training continues from that model.")


def add_finetune(subparsers: Any) -> None:
    _add(subparsers, "finetune", "fine-tune a trained model on a few samples of new data",
         "Fine-tune a model (default: the bundled one) on CNNT HDF5 files of pairs, or on noisy stacks "
         "alone (--noisy). The default recipe for pairs, few-sample, runs a budget of steps on random "
         "patches fitted to the data and the machine and keeps the starting model unless validation PSNR "
         "improves; noisy stacks without clean images train with the self-supervised recipe (every other frame "
         "learns to predict the frames in between, validated by that loss on held-out regions); --recipe "
         "reference runs the reference's fine-tuning recipe (learning rate 2.5e-5, ssim + 0.1 mse, 30 epochs).")


def _add(subparsers: Any, command: str, help_text: str, description: str) -> None:
    p = subparsers.add_parser(
        command, help=help_text, description=description,
        epilog="The reference's experiment-tracker options (--project, --wandb_entity, --run_notes, "
               "--num_samples_wandb, --num_test_samples_wandb) and --save_cycle, --test_image_path are "
               "accepted and ignored. Under torchrun --nproc_per_node N the command trains data-parallel.",
    )
    from .interlace import MOTIONS
    from .recipes import DEFAULT_FINETUNE, DEFAULT_TRAIN, RECIPES
    from .settings import OBJECTIVES

    offered = COMMAND_RECIPES[command]
    default_recipe = DEFAULT_TRAIN if command == "train" else DEFAULT_FINETUNE
    r = RECIPES[default_recipe].settings
    auto = RECIPES[default_recipe].auto

    def show(value: Any, name: str = "") -> str:
        if name in auto:
            return f"{default_recipe} recipe: up to {value}, fitted to the data and the memory"
        text = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return f"{default_recipe} recipe: {text}"

    heights = [h for h, _ in r.patch_sizes]
    widths = [w for _, w in r.patch_sizes]
    finetuning = command == "finetune"
    p.add_argument("--recipe", choices=offered, default=None if finetuning else default_recipe,
                   help=f"the settings every flag below defaults to (default: {default_recipe}"
                        + (", or self-supervised when --noisy stacks are given" if finetuning else "")
                        + "); see docs/training.md")
    g = p.add_argument_group("data")
    g.add_argument("--h5files", nargs="+", required=not finetuning, metavar="H5",
                   help="CNNT HDF5 training files (one group per sample with noisy_im and clean_im)")
    if finetuning:
        g.add_argument("--noisy", nargs="+", metavar="FILE[:DATASET]",
                       help="noisy stacks without clean images, trained on self-supervised: TIFF files (every "
                            "series) or HDF5 files (every image dataset, or the one named after a colon); the "
                            "last quarter of each validates when there are up to three, else the last fifth")
        g.add_argument("--objective", choices=OBJECTIVES,
                       help="how noisy stacks are learnt from: interlaced (every other frame predicts the frames "
                            "in between; the default) or blind-spot (hidden pixels predicted from their "
                            "surroundings and the other frames; single frames always do)")
        g.add_argument("--motion", choices=MOTIONS,
                       help="with the interlaced objective, how the neighbouring frames are brought onto the "
                            "frame they stand for: flow (along the optical flow of the starting model's "
                            "output; the default) or none")
        g.add_argument("--blind_spot", type=float, metavar="FRACTION",
                       help="with --objective blind-spot, the fraction of the pixels of every frame hidden "
                            "(default: 0.02)")
    g.add_argument("--test_case", nargs="+", metavar="H5",
                   help="HDF5 files whose samples are denoised whole after training to report test metrics "
                        "(default: the test part of the split)")
    g.add_argument("--val_case", nargs="+", metavar="H5", help="HDF5 files to validate on instead of the split")
    g.add_argument("--ratio", nargs=3, type=int, default=[90, 5, 5], metavar=("TRAIN", "VAL", "TEST"),
                   help="percentages of every file's samples (shuffled with --seed) for training, validation "
                        "and test (default: 90 5 5)")
    g.add_argument("--fine_samples", type=int, default=-1, metavar="N",
                   help="fine-tune on the first N samples of the one training file, validating and testing on "
                        "its last 5 (default: use --ratio)")
    g.add_argument("--time", type=int, help=f"frames per patch ({show(r.time, 'time')})")
    g.add_argument("--height", nargs="+", type=int, help=f"patch heights ({show(heights, 'patch_sizes')})")
    g.add_argument("--width", nargs="+", type=int, help=f"patch widths ({show(widths, 'patch_sizes')})")
    g.add_argument("--per_scaling", action="store_true", default=None,
                   help="scale intensities by their 1.5 and 99.5 percentiles (new models only)")
    g.add_argument("--im_value_scale", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="intensities mapped to 0 and 1 (new models only; default: 0 65536)")
    g.add_argument("--valu_thres", type=float, help=f"foreground value threshold ({show(r.value_thres)})")
    g.add_argument("--area_thres", type=float,
                   help=f"foreground fraction a patch should reach ({show(r.area_thres)})")
    g.add_argument("--num_patches_per_train_sample", type=int, metavar="N",
                   help=f"patches per sample and patch size in every epoch, unless --steps_per_epoch is set "
                        f"({show(r.patches_per_sample)})")
    g.add_argument("--num_patches_per_val_sample", type=int, metavar="N",
                   help=f"fixed validation patches per sample ({show(r.val_patches_per_sample)})")

    g = p.add_argument_group("model (new models only; a loaded model keeps its architecture)")
    g.add_argument("--load_path", metavar="MODEL",
                   help="start from this model: a napari-cnnt model file or a reference .pt with its JSON"
                        + (" (default: the bundled model)" if command == "finetune" else ""))
    g.add_argument("--preset", choices=("reference", "small"), default="reference",
                   help="architecture to start from before the flags below (default: reference)")
    g.add_argument("--blocks", nargs="+", type=int, help="channels per U-net level, e.g. 32 64 96")
    g.add_argument("--blocks_per_set", type=int)
    g.add_argument("--n_head", type=int)
    g.add_argument("--kernel_size", type=int)
    g.add_argument("--stride", type=int)
    g.add_argument("--padding", type=int)
    g.add_argument("--dropout_p", type=float)
    g.add_argument("--norm_mode", choices=("layer", "batch", "instance", "mixed"))
    g.add_argument("--with_mixer", type=int, choices=(0, 1))
    g.add_argument("--no_residual", action="store_true", default=None)
    g.add_argument("--use_conv_3D", action="store_true", help="not supported")

    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", nargs="+", help=f"losses: mse l1 sobel ssim ssim3D ({show(r.loss)})")
    g.add_argument("--loss_weights", nargs="+", type=float, help=f"one weight per loss ({show(r.loss_weights)})")
    g.add_argument("--optim", choices=("adamw", "nadam", "sgd"), help=f"optimiser ({show(r.optimizer)})")
    g.add_argument("--global_lr", type=float, help=f"learning rate, the peak of the schedule ({show(r.lr)})")
    g.add_argument("--weight_decay", type=float, help=f"({show(r.weight_decay)})")
    g.add_argument("--beta1", type=float, help=f"({show(r.betas[0])})")
    g.add_argument("--beta2", type=float, help=f"({show(r.betas[1])})")
    g.add_argument("--no_w_decay", action="store_true", default=None,
                   help="no weight decay on biases and norm weights")
    g.add_argument("--clip_grad_norm", type=float, help=f"gradient clipping norm; <= 0: off ({show(r.clip_grad_norm)})")
    g.add_argument("--scheduler", choices=("ReduceLROnPlateau", "StepLR", "OneCycleLR", "WarmupCosine", "none"),
                   help=f"learning-rate schedule ({show(r.scheduler)})")
    g.add_argument("--num_epochs", type=int, help=f"epochs ({show(r.epochs)})")
    g.add_argument("--steps_per_epoch", type=int, metavar="N",
                   help=f"a fixed number of steps of random patches per epoch; 0: one pass over the samples "
                        f"({show(r.steps_per_epoch)})")
    g.add_argument("--patience", type=int, metavar="N",
                   help=f"end after N epochs without a better validation score; 0: never ({show(r.patience)})")
    g.add_argument("--batch_size", type=int,
                   help=f"patches per step, over all processes ({show(r.batch_size, 'batch_size')})")
    g.add_argument("--skip_LSUV", action="store_true", help="no LSUV initialisation (never done when fine-tuning)")
    g.add_argument("--train_only", action="store_true", help="no validation; keep the last weights")
    g.add_argument("--time_scale", type=int, default=0, help="only 0 is supported")
    g.add_argument("--seed", type=int, help=f"random seed ({show(r.seed)})")

    g = p.add_argument_group("output")
    g.add_argument("--run_name", help=f"names the output files (default: {command}_DATE_TIME)")
    g.add_argument("--model_path", type=Path, default=Path("./logs/model"), help="folder of the final model")
    g.add_argument("--check_path", type=Path, default=Path("./logs/check"), help="folder of the checkpoint")
    g.add_argument("--result_path", type=Path, default=Path("./logs/results"), help="folder of the metrics CSV")
    g.add_argument("--log_path", type=Path, default=Path("./logs/logs"), help="folder of the log file")
    g.add_argument("-o", "--output", type=Path, help="the final model file (default: MODEL_PATH/RUN_NAME.safetensors)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing final model file (a resumed run replaces its own); never an input")
    g.add_argument("--checkpoint", type=Path,
                   help="checkpoint file, resumed from when it exists (default: CHECK_PATH/RUN_NAME.ckpt)")
    g.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' (default: auto)")
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 compute (default: where the hardware supports it)")

    g = p.add_argument_group("accepted for compatibility, ignored")
    for name in TRACKER_FLAGS + tuple(UNUSED_FLAGS):
        g.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.set_defaults(run=run_train if command == "train" else run_finetune)


def run_train(args: argparse.Namespace) -> int:
    return _run(args, "train")


def run_finetune(args: argparse.Namespace) -> int:
    return _run(args, "finetune")


# ----------------------------------------------------------------------------- the run
def _warn_ignored(args: argparse.Namespace) -> None:
    tracker = [f"--{n}" for n in TRACKER_FLAGS if getattr(args, n) is not None]
    if tracker:
        log.warning(f"warning: ignoring experiment-tracker option(s) {', '.join(tracker)}: napari-cnnt writes a "
                    "metrics CSV and a log file instead")
    for name, why in UNUSED_FLAGS.items():
        if getattr(args, name) is not None:
            log.warning(f"warning: ignoring --{name}: {why}")


def _check(args: argparse.Namespace) -> None:
    if args.h5files is None and not getattr(args, "noisy", None):
        raise ValueError("give training data: --h5files with pairs, or --noisy with noisy stacks alone")
    if args.use_conv_3D:
        raise TrainingSettingsError("--use_conv_3D is not supported: napari-cnnt's CNNT uses 2-D convolutions")
    if args.time_scale != 0:
        raise TrainingSettingsError("--time_scale is not supported (only 0: time-lapse pairs)")
    if args.height is not None and args.width is not None and len(args.height) != len(args.width):
        raise TrainingSettingsError(f"--height and --width must list as many sizes, got {args.height} and "
                                    f"{args.width}")


def _noisy_spec(spec: str) -> tuple[Path, str]:
    """``FILE[:DATASET]`` of ``--noisy`` as the file and the dataset ("" for all); a file whose name holds a
    colon is taken whole."""
    path, _, key = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    return Path(path), key


def _check_output(args: argparse.Namespace, output: Path, checkpoint: Path) -> None:
    """Before any work: the final model must not replace an input, nor an existing file unless asked
    (or the run resumes, and so replaces its own)."""
    noisy = [_noisy_spec(spec)[0] for spec in getattr(args, "noisy", None) or ()]
    inputs = [*(args.h5files or ()), *noisy, *(args.val_case or ()), *(args.test_case or ()), args.load_path,
              checkpoint]
    overwrite = args.overwrite or checkpoint.exists()
    if output.parent.is_dir():
        check_output(output, overwrite=overwrite, inputs=inputs, error=UsageError)


def _model(args: argparse.Namespace, command: str) -> tuple[Any, str | None]:
    """The model to train and where it came from (None: a new one)."""
    from ..model.checkpoint import CheckpointError, load_model
    from ..model.config import ConfigError, preset
    from ..normalization import Normalization
    from .api import new_model

    given = [f"--{n}" for n in MODEL_FLAGS if getattr(args, n) is not None]
    if args.load_path is not None or command == "finetune":
        try:
            model = load_model(args.load_path)
        except CheckpointError:
            if args.load_path is None:
                raise UsageError("this installation of napari-cnnt has no bundled model yet; "
                                 "start from a model file with --load_path MODEL") from None
            raise
        if given:
            log.warning(f"warning: ignoring {', '.join(given)}: the architecture comes from the loaded model")
        scaling = ["--per_scaling"] * bool(args.per_scaling) + ["--im_value_scale"] * (args.im_value_scale is not None)
        if scaling:
            log.warning(f"warning: ignoring {', '.join(scaling)}: data are scaled with the loaded model's "
                        f"normalisation ({model.normalization})")
        return model, str(args.load_path or "bundled model")
    recipe = _recipe(args).settings
    fields = {n: getattr(args, n) for n in MODEL_FLAGS if getattr(args, n) is not None}
    height = args.height[0] if args.height else recipe.patch_sizes[0][0]
    width = args.width[0] if args.width else recipe.patch_sizes[0][1]
    try:
        config = preset(args.preset).replace(**fields, time=args.time or recipe.time, height=height, width=width)
    except ConfigError as e:
        raise TrainingSettingsError(str(e)) from None
    normalization = Normalization.reference(bool(args.per_scaling), args.im_value_scale)
    return new_model(config, normalization, args.seed or 0), None


def _options(args: argparse.Namespace, new_model: bool) -> dict[str, Any]:
    """The settings given on the command line, as ``TrainSettings`` fields (the recipe gives the rest)."""
    recipe = _recipe(args).settings
    options = {field: getattr(args, flag) for flag, field in FLAG_SETTINGS.items() if getattr(args, flag) is not None}
    for name in ("blind_spot", "objective", "motion"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    for name in ("loss", "loss_weights"):
        if name in options:
            options[name] = tuple(options[name])
    if args.height is not None or args.width is not None:
        heights = args.height or [h for h, _ in recipe.patch_sizes]
        widths = args.width or [w for _, w in recipe.patch_sizes]
        if len(heights) != len(widths):
            raise TrainingSettingsError(f"--height and --width must list as many sizes, got {heights} and {widths}")
        options["patch_sizes"] = tuple(zip(heights, widths))
    if args.beta1 is not None or args.beta2 is not None:
        options["betas"] = (recipe.betas[0] if args.beta1 is None else args.beta1,
                            recipe.betas[1] if args.beta2 is None else args.beta2)
    if args.no_w_decay:
        options["no_w_decay"] = True
    options["lsuv"] = new_model and not args.skip_LSUV  # LSUV initialises new models only
    return options


def _recipe(args: argparse.Namespace) -> Any:
    """The recipe named, or by default the self-supervised one when noisy stacks alone are given."""
    from .recipes import recipe_for

    return recipe_for(args.recipe, not getattr(args, "noisy", None))


def noisy_stacks(specs: list[str], normalization: Any) -> list:
    """Samples without truth from ``FILE`` or ``FILE:DATASET`` specs: every series of a TIFF file,
    every image dataset of an HDF5 file (or the one named), each ``[T, Y, X]`` or ``[Y, X]``."""
    import numpy as np

    from ..io import formats, hdf5, tiff
    from .data import make_samples

    samples = []
    for spec in specs:
        path, key = _noisy_spec(spec)
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        fmt = formats.by_content(path)
        if fmt is formats.TIFF:
            if key:
                raise ValueError(f"{spec}: a dataset name only applies to HDF5 files")
            images = tiff.read_tiff(path)
        elif fmt is formats.HDF5:
            keys = [key] if key else hdf5.list_image_datasets(path)
            images = [hdf5.read_dataset(path, k) for k in keys]
        else:
            raise ValueError(f"{path}: neither a TIFF nor an HDF5 file")
        for image in images:
            if len(image.data.shape) not in (2, 3) or image.axes[-2:] != "YX":
                raise ValueError(f"{path}: {image.name} has axes {image.axes}; noisy stacks must be [T, Y, X] or "
                                 "[Y, X]")
            samples += make_samples(f"{path.name}:{image.name}", np.asarray(image.data), None, normalization)
    if not samples:
        raise ValueError(f"no images in {', '.join(specs)}")
    return samples


def describe(s: Any) -> str:
    """A training run's shape in one line: epochs, steps, patches, learning rate."""
    sizes = ", ".join(f"{h} x {w}" for h, w in s.patch_sizes)
    steps = f" x {s.steps_per_epoch} steps" if s.steps_per_epoch else ""
    return (f"{s.epochs} epochs{steps} of {s.batch_size} patches of {s.time} x {sizes}, lr {s.lr:g} "
            f"({s.scheduler}), loss {' + '.join(f'{w:g} {n}' for n, w in zip(s.loss, s.loss_weights))}")


def _data(args: argparse.Namespace, normalization: Any) -> tuple[list, list, list, Any]:
    """Train, validation and test samples by the reference's rules, and the split to report; noisy
    stacks alone (``--noisy``) are held out by fine-tuning's rule (``data.split_samples``)."""
    from .data import Split, h5_keys, samples_from_keys, split_h5_files, split_samples

    noisy = noisy_stacks(args.noisy, normalization) if getattr(args, "noisy", None) else []
    if noisy:
        noisy_train, noisy_val, noisy_split = split_samples(noisy, [] if args.train_only else None)
    if not args.h5files:
        split = Split(noisy_split.train, noisy_split.val, noisy_split.notes)
        return noisy_train, noisy_val, [], split
    parts, notes = split_h5_files(args.h5files, args.ratio, args.fine_samples, args.seed or 0)
    if args.val_case:
        parts["val"] = [(Path(f), k) for f in args.val_case for k in h5_keys(f)]
        notes = []
    if args.test_case:
        parts["test"] = [(Path(f), k) for f in args.test_case for k in h5_keys(f)]
    if args.train_only:
        parts["val"], notes = [], ["--train_only: no validation, the last weights are kept"]
    trained = set(parts["train"])
    if any(key in trained for key in parts["test"]):  # e.g. --ratio 100 0 0 would test a training sample
        parts["test"] = [key for key in parts["test"] if key not in trained]
        notes = notes + ["test samples that also train are left out of the test" if parts["test"] else
                         "no test metrics: every test sample also trains (give held-out files with --test_case)"]
    train = samples_from_keys(parts["train"], normalization)
    val = samples_from_keys(parts["val"], normalization)
    if noisy:
        train, val, notes = train + noisy_train, val + noisy_val, notes + noisy_split.notes
    split = Split([s.name for s in train], [s.name for s in val], notes)
    return train, val, parts["test"], split


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """The first Ctrl-C or SIGTERM asks training to stop after the current step; a second one interrupts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("stopping after this step (press Ctrl-C again to interrupt at once)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _Reporter:
    """Progress bar per epoch, a log line per epoch and the metrics CSV (rank 0 only)."""

    def __init__(self, metrics_path: Path):
        self.metrics_path = metrics_path
        self.bar = None

    def __call__(self, p: Any) -> None:
        from tqdm import tqdm

        if p.event == "step":
            if self.bar is None:
                self.bar = tqdm(total=p.steps, desc=f"epoch {p.epoch}/{p.epochs}", unit="step",
                                file=sys.stderr, dynamic_ncols=True, leave=False)
            self.bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}", refresh=False)
            self.bar.update(1)
            return
        self.close()
        from .history import METRIC_NAMES
        from .plan import minutes_text
        from .settings import SELF_SUPERVISED_SCORES

        r = p.record
        left = f", about {minutes_text(p.remaining)} left" if p.remaining and p.epoch < p.epochs else ""
        val = []
        if not math.isnan(r["val_loss"]):
            val.append(f"val loss {r['val_loss']:.4f}, val PSNR {r['val_psnr']:.2f} dB, val SSIM {r['val_ssim']:.4f}")
        for key in SELF_SUPERVISED_SCORES:
            if not math.isnan(r.get(key, math.nan)):
                val.append(f"val {METRIC_NAMES[key]} {r[key]:.5f}")
        scores = ", ".join(val or ["no validation"])
        log.info(f"epoch {p.epoch}/{p.epochs}: train loss {r['train_loss']:.4f}, {scores}, "
                 f"lr {r['lr']:.2e}, {r['seconds']:.1f} s{left}")
        p.history.to_csv(self.metrics_path)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _setup_logging(log_file: Path | None) -> list[logging.Handler]:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handlers


def _run(args: argparse.Namespace, command: str) -> int:
    from . import distributed

    _check(args)
    ranks, device = distributed.setup(args.device)
    run_name = args.run_name or f"{command}_{_dt.datetime.now():%Y%m%d-%H%M%S}"
    handlers = _setup_logging(args.log_path / f"{run_name}.log" if ranks.is_main else None)
    if not ranks.is_main:
        log.setLevel(logging.ERROR)
    try:
        _warn_ignored(args)
        return _train(args, command, run_name, ranks, device)
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        distributed.teardown()


def _train(args: argparse.Namespace, command: str, run_name: str, ranks: Any, device: str | None) -> int:
    from ..model.checkpoint import save_model
    from ..runtime import Runtime
    from .api import evaluate, provenance
    from .data import samples_from_keys
    from .plan import SettingError, plan_run
    from .trainer import Trainer

    try:
        runtime = Runtime.create(device, args.fast)  # an impossible --device or --fast is refused before any data
    except ValueError as e:
        raise UsageError(str(e)) from None
    output = args.output or args.model_path / f"{run_name}.safetensors"
    checkpoint = args.checkpoint or args.check_path / f"{run_name}.ckpt"
    _check_output(args, output, checkpoint)
    model, base = _model(args, command)
    options = _options(args, new_model=base is None)
    recipe = _recipe(args)
    try:
        recipe.with_options(**options)  # absurd values are refused before the data are read
    except (ValueError, TypeError) as e:
        raise TrainingSettingsError(_flag_names(str(e))) from None
    try:
        train, val, test_keys, split = _data(args, model.normalization)
    except InputError:
        raise
    except ValueError as e:  # the data rules of training.data: the message names the file and the sample
        raise ImageFileError(str(e)) from None
    try:
        plan = plan_run(recipe, options, model.config, train, val, runtime,
                        sum(p.numel() for p in model.parameters()))
    except SettingError as e:
        raise TrainingSettingsError(e.message(SETTING_FLAGS)) from None
    settings = plan.settings
    metrics_path = args.result_path / f"{run_name}_metrics.csv"
    resuming = checkpoint.exists()
    log.info(f"napari-cnnt {command} {run_name}: {split}".replace("\n", "; "))
    log.info(f"{'resuming from' if resuming else 'checkpoint:'} {checkpoint}; {ranks.world_size} process(es)")
    log.info(f"recipe {recipe.name}: {describe(settings)}; {plan.estimate}")
    for note in plan.notes:
        log.info(f"note: {note}")

    reporter = _Reporter(metrics_path)
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            trainer = Trainer(model, train, val, settings, split=split, device=device, fast=args.fast,
                              progress=reporter, stop=stop, checkpoint=checkpoint)
            log.info(f"device {trainer.runtime.device}, {'bfloat16' if trainer.runtime.fast else 'float32'}, "
                     f"{trainer.steps} steps per epoch")
            trained, history = trainer.run()
    except FloatingPointError as e:
        log.error(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log.error(f"interrupted; {checkpoint} holds the last finished epoch: run the same command with "
                  f"--run_name {run_name} to resume")
        return 130
    finally:
        reporter.close()
    if not ranks.is_main:
        return 0

    if history.stopped:
        log.warning(f"stopped during epoch {len(history) + 1}; run the same command with --run_name {run_name} "
                    "to resume")
    elif history.early:
        log.info(f"ended after epoch {len(history)}: validation {history.metric[4:]} stopped improving")
    history.notes = list(plan.notes)
    log.info(history.summary())
    test = {}
    if test_keys and not history.stopped:
        test = evaluate(trained, samples_from_keys(test_keys, model.normalization), loss=settings.loss,
                        loss_weights=settings.loss_weights, device=trainer.runtime.device, fast=trainer.runtime.fast)
        log.info(f"test ({len(test_keys)} whole stacks): loss {test['loss']:.4f}, PSNR {test['psnr']:.2f} dB, "
                 f"SSIM {test['ssim']:.4f}")
    history.to_csv(metrics_path)
    meta = provenance(history, base, settings, recipe.name)
    meta["metrics"].update({f"test_{k}": v for k, v in test.items()})
    meta["training"].update(command=command, run_name=run_name)
    save_model(trained, output, overwrite=args.overwrite or resuming, **meta)
    log.info(f"wrote {output} (weights of epoch {history.best_epoch}) and {metrics_path}")
    return 0
