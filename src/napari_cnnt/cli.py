"""The ``napari-cnnt`` command: one subcommand per task, each a pair of functions.

``add_<task>(subparsers)`` declares the options and ``run_<task>(args) -> int``
does the work; a new task (``train``, ``finetune``) adds one such pair and
registers it in :data:`SUBCOMMANDS`. Problems the user can fix (a bad file, a
bad option: :class:`napari_cnnt.errors.InputError`) end the command with one
line on stderr and exit status 1; any other exception is a bug and shows its
traceback. Outputs that exist are refused unless ``--overwrite`` is given, and
an input of the command is never written. Ctrl-C and SIGTERM both stop the
command and remove its temporary files.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import DataError, ImageFileError, InputError, UsageError
from .io import formats
from .io.atomic import check_output
from .metrics import psnr_db
from .training.cli import add_finetune, add_train


def add_overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output file that exists (never one of the inputs)")


# ----------------------------------------------------------------------------- denoise
def add_denoise(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "denoise",
        help="denoise a TIFF or HDF5 time-lapse stack",
        description=(
            "Denoise a time-lapse stack tile by tile and write the result as float32 in the input's "
            "intensity units, keeping its axes and pixel size. Stacks larger than memory are read and "
            "written piece by piece."
        ),
    )
    p.add_argument("input", metavar="INPUT", type=Path, help="a TIFF (.tif, .tiff) or HDF5 (.h5, .hdf5) file")
    p.add_argument(
        "-o", "--output", metavar="OUTPUT", type=Path,
        help="where to write: .tif/.tiff (ImageJ-compatible TIFF) or .h5/.hdf5; "
             "default: INPUT's name with '_denoised' added, same format. Never the input itself",
    )
    p.add_argument("--model", metavar="PATH", type=Path,
                   help="a napari-cnnt model file, or a reference checkpoint (.pt) with its JSON beside it; "
                        "default: the bundled model")
    p.add_argument("--tile", metavar=("T", "H", "W"), type=int, nargs=3,
                   help="tile size in frames, rows and columns (default: the model's training patch, "
                        "fitted to the stack and the device's memory)")
    p.add_argument("--overlap", metavar=("T", "H", "W"), type=int, nargs=3,
                   help="overlap between neighbouring tiles (default: a quarter of the tile)")
    p.add_argument("--batch-size", metavar="N", type=int, help="tiles per network call (default: by device memory)")
    p.add_argument("--device", metavar="D", default="auto",
                   help="'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:N' or 'mps' (default: auto)")
    p.add_argument("--dataset", metavar="KEY",
                   help="HDF5: the dataset to denoise (needed when the file holds several; the output uses the "
                        "same name). TIFF: the series number (default 0)")
    p.add_argument("--time-axis", metavar="N", type=int,
                   help="which axis is time (default: the axis labelled T, or the first of a 3-D stack); "
                        "stacks along other leading axes (positions, channels) are denoised one by one")
    p.add_argument("--allow-external-data", action="store_true",
                   help="HDF5: also read datasets whose data are stored in other files (external storage, "
                        "virtual datasets, external links); refused by default")
    add_overwrite_flag(p)
    _add_fast_flag(p)
    p.set_defaults(run=run_denoise)


def run_denoise(args: argparse.Namespace) -> int:
    from .inference import denoise
    from .io import Image

    output = args.output or default_output(args.input)
    output_format = _format(output, "output")
    check_output(output, overwrite=args.overwrite, inputs=[args.input, args.model], error=UsageError)
    runtime = _runtime(args)

    with contextlib.ExitStack() as stack:
        image = read_image(args.input, args.dataset, args.allow_external_data)
        if hasattr(getattr(image.data, "file", None), "close"):  # an open HDF5 dataset
            stack.callback(image.data.file.close)
        time_axis = _time_axis_of(image, args.time_axis)
        model = _load_model(args.model)
        result = _output_buffer(image.data.shape, output, stack)
        bar = stack.enter_context(_progress_bar(f"denoising {args.input.name}"))
        try:
            denoise(
                image.data, model, tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
                device=runtime, progress=bar, out=result, time_axis=time_axis,
            )
        except DataError as e:
            raise DataError(f"{args.input}: {e}") from None
        except InputError:
            raise
        except (ValueError, TypeError) as e:  # denoise's checks of --tile, --overlap, --time-axis and the data
            raise UsageError(f"{args.input}: {e}") from None
        except (OSError, zlib.error) as e:  # h5py and the TIFF decoders, on damaged data
            raise ImageFileError(f"{args.input}: the image data cannot be read, the file may be damaged "
                                 f"({' '.join(str(e).split())})") from None
        denoised = Image(result, image.name, image.axes, image.scale, image.unit)
        write_image(output, output_format, denoised, args.overwrite)
    print(f"wrote {output}", file=sys.stderr)
    return 0


def add_demo(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="denoise the synthetic sample with the bundled model and report PSNR",
        description="Denoise the plugin's synthetic sample recording (32 x 256 x 256, uint16) and print "
                    "its PSNR against the known clean truth before and after.",
    )
    p.add_argument("--model", type=Path, metavar="PATH", help="model file (default: the bundled model)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' (default: auto)")
    p.add_argument("-o", "--output", type=Path, metavar="PATH", help="also write the denoised stack (TIFF or HDF5)")
    add_overwrite_flag(p)
    _add_fast_flag(p)
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import time

    from .inference import denoise
    from .io import Image
    from .synthetic import sample_recording

    output_format = _format(args.output, "output") if args.output else None
    if args.output:
        check_output(args.output, overwrite=args.overwrite, inputs=[args.model], error=UsageError)
    runtime = _runtime(args)
    model = _load_model(args.model)
    noisy, clean = sample_recording()
    start = time.perf_counter()
    with _progress_bar("denoising the sample") as bar:
        result = denoise(noisy, model, device=runtime, progress=bar)
    seconds = time.perf_counter() - start
    before, after = psnr_db(noisy, clean), psnr_db(result, clean)
    print(f"sample {' x '.join(map(str, noisy.shape))}: PSNR {before:.2f} dB noisy -> {after:.2f} dB denoised "
          f"({after - before:+.2f} dB) in {seconds:.1f} s")
    if args.output:
        write_image(args.output, output_format, Image(result, "denoised sample", "TYX", (1.0, 0.1, 0.1), "um"),
                    args.overwrite)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- export
def add_export(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export", help="write a model as a bioimage.io model package (or as a napari-cnnt file)",
        description="Write a model as a bioimage.io model package (spec 0.5) that other bioimage.io tools "
                    "run: OUTPUT.zip, or a folder for any other name. An OUTPUT ending in .safetensors "
                    "writes napari-cnnt's own format instead (e.g. to convert a reference checkpoint or a "
                    "package back).",
    )
    p.add_argument("output", metavar="OUTPUT", type=Path, help="OUT.zip or a folder; or OUT.safetensors")
    p.add_argument("--model", metavar="PATH", type=Path,
                   help="a napari-cnnt model file, a reference checkpoint (.pt) or a bioimage.io package; "
                        "default: the bundled model")
    p.add_argument("--name", help="the package's name (letters, digits, spaces and _+-())")
    p.add_argument("--author", action="append", metavar="NAME",
                   help="an author of the model (repeat for several; default: the bundled model's developers, "
                        "otherwise 'napari-cnnt user')")
    p.add_argument("--test-input", metavar="FILE", type=Path,
                   help="a TIFF or HDF5 stack whose centre becomes the package's test input "
                        "(default: the synthetic sample)")
    p.add_argument("--dataset", metavar="KEY", help="with --test-input: the HDF5 dataset or TIFF series")
    add_overwrite_flag(p)
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from .model.bioimageio import save_package
    from .model.checkpoint import provenance_of, save_model

    inputs = [args.model, args.test_input]
    if args.output.is_dir() and args.output.suffix.lower() not in (".zip", ".safetensors"):
        if not args.overwrite:  # a package folder
            raise UsageError(f"{args.output}: already exists; choose another name or allow overwriting it "
                             "(--overwrite)")
        if any(p is not None and (Path(p).resolve().is_relative_to(args.output.resolve())) for p in inputs):
            raise UsageError(f"{args.output}: holds an input of this command; refusing to overwrite it")
    else:
        check_output(args.output, overwrite=args.overwrite, inputs=inputs, error=UsageError)
    model = _load_model(args.model)
    if args.output.suffix.lower() == ".safetensors":
        save_model(model, args.output, overwrite=args.overwrite)
    else:
        test_input = None
        if args.test_input is not None:
            image = read_image(args.test_input, args.dataset)
            data = np.asarray(image.data[(0,) * (len(image.data.shape) - 3)])  # the first [T, Y, X] stack
            test_input = data
        authors = args.author or (["napari-cnnt developers"] if args.model is None else None)
        save_package(model, args.output, provenance_of(model), name=args.name, authors=authors,
                     test_input=test_input, overwrite=args.overwrite)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- gui
GUI_WIDGETS = ("Denoise", "Fine-tune")


def add_gui(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "gui", help="open napari with the sample pair (or your stacks) and the plugin's widgets",
        description="Open napari with the synthetic noisy/clean sample pair, or the given stacks, and the "
                    "Denoise and Fine-tune widgets docked.",
    )
    p.add_argument("files", nargs="*", type=Path, metavar="FILE",
                   help="TIFF or HDF5 stacks to open instead of the sample pair")
    p.set_defaults(run=run_gui)


def run_gui(args: argparse.Namespace) -> int:
    viewer = open_viewer(args.files)
    import napari

    napari.run()
    return 0 if viewer is not None else 1


def open_viewer(files: list[Path] | None = None, show: bool = True) -> Any:
    """A napari viewer with ``files`` (default: the sample pair) and the plugin's widgets docked."""
    try:
        import napari
    except ImportError:
        raise UsageError("the gui needs napari: pip install 'napari-cnnt[napari]'") from None
    for f in files or []:
        if not f.is_file():
            raise UsageError(f"{f}: no such file")
    viewer = napari.Viewer(title="napari-cnnt", show=show)
    if files:
        for f in files:
            viewer.open(f, plugin="napari-cnnt")
    else:
        noisy, _ = viewer.open_sample("napari-cnnt", "noisy_clean_pair")
        viewer.layers.selection.active = noisy  # the Denoise widget starts on the noisy stack
    for name in GUI_WIDGETS:
        viewer.window.add_plugin_dock_widget("napari-cnnt", name, tabify=False)
    return viewer


# ----------------------------------------------------------------------------- simulate
def add_simulate(subparsers: Any) -> None:
    from .synthetic import STRUCTURES

    p = subparsers.add_parser(
        "simulate", help="write simulated noisy/clean training pairs to a CNNT HDF5 file",
        description="Simulate fluorescence time-lapse recordings with random acquisition conditions "
                    "(peak 5-1000 photons, read noise 1-6 e-, blur, drift, bleaching, blinking) and write "
                    "them with their noise-free truth as CNNT training pairs. Recording i uses seed SEED+i, "
                    "so the same command always writes the same file.",
    )
    p.add_argument("output", type=Path, metavar="OUTPUT", help="the HDF5 file to write (.h5)")
    p.add_argument("--count", type=int, default=100, metavar="N", help="number of recordings (default: 100)")
    p.add_argument("--shape", type=int, nargs=3, default=[16, 128, 128], metavar=("T", "H", "W"),
                   help="frames, rows and columns of each recording (default: 16 128 128)")
    p.add_argument("--structures", nargs="+", choices=list(STRUCTURES), default=list(STRUCTURES), metavar="S",
                   help=f"structures to mix, from {', '.join(STRUCTURES)}; the order given is part of the "
                        "seeding (default: all, in that order)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first recording (default: 0)")
    add_overwrite_flag(p)
    p.set_defaults(run=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    from .io.hdf5 import write_training_pairs
    from .synthetic import random_recording

    if _format(args.output, "output") != "hdf5":
        raise UsageError(f"{args.output}: training pairs are written as HDF5; use a .h5 name")
    check_output(args.output, overwrite=args.overwrite, error=UsageError)
    if args.count < 1:
        raise UsageError(f"--count must be at least 1, got {args.count}")
    if min(args.shape) < 1 or args.shape[1] < 8 or args.shape[2] < 8:
        raise UsageError(f"--shape must be at least 1 x 8 x 8, got {' x '.join(map(str, args.shape))}")
    size_gb = args.count * np.prod(args.shape, dtype=np.float64) * 6 / 1e9
    if size_gb > 50:
        raise UsageError(f"{args.count} recordings of {' x '.join(map(str, args.shape))} would take "
                         f"{size_gb:.0f} GB; write fewer or smaller ones")
    from tqdm import tqdm

    pairs = [
        random_recording(tuple(args.shape), seed=args.seed + i, structures=args.structures)[:2]
        for i in tqdm(range(args.count), desc="simulating", unit="recording", file=sys.stderr, dynamic_ncols=True)
    ]
    write_training_pairs(args.output, pairs, overwrite=args.overwrite)
    print(f"wrote {args.count} recording(s) of {' x '.join(map(str, args.shape))} to {args.output}", file=sys.stderr)
    return 0


def _add_fast_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 fast path (default: on where the hardware computes bf16 natively)")


def _runtime(args: argparse.Namespace) -> Any:
    from .runtime import Runtime

    try:
        return Runtime.create(args.device, args.fast)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _load_model(path: Path | None) -> Any:
    from .model.checkpoint import CheckpointError, load_model

    try:
        return load_model(path)
    except CheckpointError:
        if path is None:
            raise UsageError(
                "this installation of napari-cnnt has no bundled model yet; pass one with --model PATH"
            ) from None
        raise


def default_output(path: Path) -> Path:
    stem, suffix = formats.split_suffix(path)
    return path.with_name(stem + "_denoised" + suffix)


def _format(path: Path, role: str) -> str:
    fmt = formats.by_name(path)
    if fmt is None:
        suffix = path.suffix.lower()
        raise UsageError(f"{path}: unknown {role} format {suffix or '(no extension)'!r}; use "
                         f"{formats.usual_suffixes()}")
    return fmt.name


def read_image(path: Path, dataset: str | None, allow_external: bool = False) -> Any:
    """The stack to denoise, read lazily, from a TIFF series or an HDF5 dataset."""
    from .io import hdf5, tiff

    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    fmt = formats.by_content(path)
    if fmt is formats.TIFF:
        images = tiff.read_tiff(path)
        try:
            return images[int(dataset or 0)]
        except (ValueError, IndexError):
            raise UsageError(
                f"{path}: --dataset must be a series number from 0 to {len(images) - 1} for this TIFF file"
            ) from None
    if fmt is formats.HDF5:
        if dataset is None:
            keys = hdf5.list_image_datasets(path, allow_external)
            if len(keys) != 1:
                listed = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
                raise UsageError(
                    f"{path}: holds {len(keys)} image datasets ({listed or 'none'}); choose one with --dataset"
                )
            dataset = keys[0]
        return hdf5.read_dataset(path, dataset, allow_external)
    raise UsageError(f"{path}: neither a TIFF nor an HDF5 file")


def _time_axis_of(image: Any, time_axis: int | None) -> int | None:
    """The axis to denoise along: as given, else the one labelled T (3-D stacks: the first)."""
    axes, ndim = image.axes, len(image.data.shape)
    if axes[-2:] != "YX":
        raise UsageError(
            f"{image.name}: axes {axes}: the last two axes must be Y and X (colour images are not supported)"
        )
    if time_axis is not None or ndim <= 3:
        return time_axis
    if "T" not in axes:
        raise UsageError(f"{image.name}: axes {axes} have no time axis (T); say which axis is time with --time-axis N")
    return axes.index("T")


def _output_buffer(shape: tuple[int, ...], output: Path, stack: contextlib.ExitStack) -> np.ndarray:
    """Where ``denoise`` writes: memory for small results, a temporary file beside the output otherwise."""
    from . import io

    if 4 * int(np.prod(shape)) <= io.LAZY_BYTES:
        return np.empty(shape, dtype=np.float32)
    folder = stack.enter_context(tempfile.TemporaryDirectory(dir=output.parent, prefix=".napari-cnnt-"))
    try:
        return np.lib.format.open_memmap(Path(folder) / "denoised.npy", mode="w+", dtype=np.float32, shape=shape)
    except OSError as e:
        raise ImageFileError(f"{output}: no room for the {4 * int(np.prod(shape)) / 1e9:.1f} GB result beside it "
                             f"({e.strerror or e})") from None


def write_image(path: Path, output_format: str, image: Any, overwrite: bool = False) -> None:
    from .io import hdf5, tiff

    if output_format == "tiff":
        tiff.write_tiff(path, image.data, axes=image.axes, scale=image.scale, unit=image.unit, overwrite=overwrite)
    else:
        hdf5.write_images_hdf5(path, [image], overwrite=overwrite)


@contextlib.contextmanager
def _progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a tqdm bar with tiles/s and the time left."""
    from tqdm import tqdm

    with tqdm(desc=description, unit="tile", file=sys.stderr, dynamic_ncols=True) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield progress


# ----------------------------------------------------------------------------- entry point
SUBCOMMANDS: list[Callable[[Any], None]] = [
    add_denoise, add_train, add_finetune, add_simulate, add_demo, add_export, add_gui,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-cnnt",
        description="Denoise fluorescence time-lapse stacks with CNNT, and train or fine-tune CNNT models, "
                    "without napari.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler's stop) raises KeyboardInterrupt like Ctrl-C, so that the
    same clean-up runs: temporary files are removed and no half-written output is left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_interrupts():
            return args.run(args)
    except KeyboardInterrupt:
        print(f"napari-cnnt {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except InputError as e:  # ImageFileError, CheckpointError, TrainingSettingsError, UsageError, DataError
        print(f"napari-cnnt {args.command}: error: {e or type(e).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
