"""bioimage.io model packages (spec 0.5) of CNNT models: written by ``save_model(format="bioimageio")``
and read back by ``load_model``.

A package is a zip file (or a folder) with an ``rdf.yaml`` describing:

- the input ``raw`` ``[batch, time, channel=1, y, x]`` in the recording's
  intensity units, and the model's normalisation as preprocessing
  (``scale_range`` over time, y and x for percentile models, ``scale_linear``
  for fixed ones). The network sees the normalised ``[B, T, 1, H, W]`` stack;
- the output ``denoised`` of the same shape: in the input's units for fixed
  normalisation (``scale_linear`` undoes it), on the normalised scale for
  percentile models (the spec has no step that undoes a percentile scaling);
- ``pytorch_state_dict`` weights with the architecture
  ``napari_cnnt.model.denoiser.CNNTDenoiser(config=...)`` taken from the
  napari-cnnt library (an environment file names it), and the same network as
  TorchScript, which runs without napari-cnnt;
- a test input (a crop of the plugin's synthetic sample, or data given by
  the caller), the test output computed from the weights, a cover image,
  documentation from the model's metadata, the training provenance, the
  license and the CNNT citation.

See docs/bioimageio.md. Needs the ``bioimageio`` extra (``bioimageio.spec``, Pillow).
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import io
import json
import math
import re
import shutil
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import tifffile
import torch

from ..errors import CheckpointError
from ..normalization import Normalization
from .config import CNNTConfig, ConfigError
from .denoiser import CNNTDenoiser

ARCHITECTURE_MODULE = "napari_cnnt.model.denoiser"
ARCHITECTURE_CALLABLE = "CNNTDenoiser"
YAML_NAMES = ("rdf.yaml", "bioimageio.yaml")
INPUT_ID, OUTPUT_ID = "raw", "denoised"
# ScaleRangeDescr's default epsilon, used in the test output exactly as the spec defines the step.
SCALE_RANGE_EPS = 1e-6
REPRODUCE_TOLERANCE = 1e-4  # absolute and relative, declared for the package's own tests
TEST_SIZE = 64  # pixels of the test tensor's height and width (layer-norm models: their own size)
CITATION = {
    "text": "Rehman A. et al. Convolutional Neural Network Transformer (CNNT) for Fluorescence Microscopy "
            "image Denoising with Improved Generalization and Fast Adaptation. arXiv:2404.04726 (2024).",
    "doi": "10.48550/arXiv.2404.04726",
    "url": "https://arxiv.org/abs/2404.04726",
}
LINKS = {"git_repo": "https://github.com/napari-cnnt/napari-cnnt"}
LICENSE = "BSD-3-Clause"  # the project's license; it covers the code and the bundled weights alike
DEFAULT_AUTHOR = "napari-cnnt user"
DEFAULT_NAME = "CNNT time-lapse denoiser"


class PackageError(CheckpointError):
    """A bioimage.io package that cannot be written or read as a CNNT model."""


def urls() -> list[str]:
    """Every URL a package written here contains (the spec checks URLs online unless told they are known)."""
    return [CITATION["url"], LINKS["git_repo"]]


# ----------------------------------------------------------------------------- recognising
def is_package(path: str | Path) -> bool:
    """Whether ``path`` is a bioimage.io package: a zip with an ``rdf.yaml`` (or ``bioimageio.yaml``)
    at its top, a folder holding one, or that YAML file itself."""
    path = Path(path)
    if path.is_dir():
        return any(_is_yaml_name(p.name) for p in path.iterdir())
    if _is_yaml_name(path.name):
        return path.is_file()
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(_is_yaml_name(name) for name in z.namelist() if "/" not in name)
    except (zipfile.BadZipFile, OSError):
        return False


def _is_yaml_name(name: str) -> bool:
    return name in YAML_NAMES or name.endswith(".bioimageio.yaml")


# ----------------------------------------------------------------------------- writing
def save_package(
    model: CNNTDenoiser,
    path: str | Path,
    provenance: Mapping[str, Any],
    *,
    name: str | None = None,
    description: str | None = None,
    authors: Sequence[str] | None = None,
    test_input: Any | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a bioimage.io model package: a zip file if ``path`` ends in ``.zip``,
    otherwise a folder. Returns ``path``. An existing package is replaced only if ``overwrite``.

    ``provenance`` is what ``save_model`` would record in a napari-cnnt file;
    it goes into the package's ``config`` and its documentation.
    ``test_input`` is a stack in the input's units (``[T, H, W]``, or more
    axes: the first stack) whose centre becomes the test tensor (default:
    the synthetic sample).
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() if path.suffix.lower() != ".zip" else path.is_file()):
        raise PackageError(f"{path}: exists and is not a {'zip file' if path.suffix.lower() == '.zip' else 'folder'}")
    if path.exists() and not overwrite:
        raise PackageError(f"{path}: already exists; choose another name or allow overwriting it (--overwrite)")
    spec = _spec()
    model = copy.deepcopy(model).cpu().eval()  # the caller's model stays where and as it is
    config = model.config
    raw = _test_stack(config, test_input)
    x = raw[None, :, None].astype(np.float32)  # [1, T, 1, H, W]
    normalised = _preprocess(x, model.normalization)
    with torch.no_grad():
        y = model(torch.from_numpy(normalised)).numpy()
    y = _postprocess(y, model.normalization)
    title = _clean_name(name or DEFAULT_NAME)
    author_names = list(authors or [DEFAULT_AUTHOR])

    with tempfile.TemporaryDirectory(prefix="napari-cnnt-bioimageio-") as tmp:
        folder = Path(tmp)
        np.save(folder / "test_input.npy", x)
        np.save(folder / "test_output.npy", y)
        tifffile.imwrite(folder / "sample_input.tif", x[0, :, 0], photometric="minisblack", metadata={"axes": "TYX"})
        tifffile.imwrite(folder / "sample_output.tif", y[0, :, 0], photometric="minisblack", metadata={"axes": "TYX"})
        torch.save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / "weights.pt")
        torchscript = _torchscript(model, normalised, folder / "weights_torchscript.pt")
        _cover(raw, y[0, :, 0], model.normalization, folder / "cover.png")
        (folder / "environment.yaml").write_text(_environment())
        (folder / "README.md").write_text(_documentation(model, title, provenance, torchscript))
        with offline(spec):
            descr = _description(spec, model, folder, title, description, author_names, provenance, torchscript)
        _write(spec, descr, path)
    return path


def _spec() -> Any:
    """The parts of bioimageio.spec used here (an optional dependency)."""
    try:
        from bioimageio.spec import (
            ValidationContext,
            load_description,
            save_bioimageio_package,
            save_bioimageio_package_as_folder,
        )
        from bioimageio.spec.model import v0_5
        from bioimageio.spec.utils import get_reader
    except ImportError:
        raise PackageError(
            "bioimage.io packages need the bioimageio extra: pip install 'napari-cnnt[bioimageio]'"
        ) from None
    return SimpleNamespace(
        v0_5=v0_5, ValidationContext=ValidationContext, load_description=load_description, get_reader=get_reader,
        save_zip=save_bioimageio_package, save_folder=save_bioimageio_package_as_folder,
    )


def offline(spec: Any) -> Any:
    """A validation context that checks every file of a package but no URL: those written here are
    declared known, so that writing, reading and validating never reach the network."""
    return spec.ValidationContext(known_files={url: None for url in urls()})


def _clean_name(name: str) -> str:
    """A name the spec accepts: letters, digits, spaces and ``_+-()``, 5 to 64 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9_+\-() ]+", " ", name)
    cleaned = re.sub(r"\s+", " ", cleaned).strip()[:64].strip()
    return cleaned if len(cleaned) >= 5 else f"CNNT {cleaned}".strip().ljust(5, "_")


def _test_stack(config: CNNTConfig, given: Any | None) -> np.ndarray:
    """The test input, ``[T, H, W]`` float32: the centre of ``given`` (an array of two or more axes,
    read lazily; the first stack along leading axes) or of the synthetic sample, at most
    ``config.time`` frames of ``TEST_SIZE`` x ``TEST_SIZE`` pixels."""
    if given is None:
        from ..synthetic import sample_recording

        given = sample_recording()[0]
    shape = tuple(int(n) for n in getattr(given, "shape", np.shape(given)))
    if len(shape) < 2 or 0 in shape:
        raise PackageError(f"the test input must be a non-empty stack of frames, got shape {list(shape)}")
    lead = (0,) * max(0, len(shape) - 3)
    frames = shape[-3] if len(shape) >= 3 else 1
    if config.norm_mode == "layer":
        size = (config.height, config.width)
    else:
        m = config.size_multiple
        size = tuple(max(2 * m, min(TEST_SIZE, n // m * m)) for n in shape[-2:])
    window = tuple(slice(max(0, (n - s) // 2), max(0, (n - s) // 2) + s) for n, s in zip(shape[-2:], size))
    index = lead + ((slice(0, min(config.time, frames)),) if len(shape) >= 3 else ()) + window
    stack = np.asarray(given[index])
    if stack.dtype.kind not in "biuf":
        raise PackageError(f"the test input must be numeric, got dtype {stack.dtype}")
    stack = stack.astype(np.float32).reshape((-1,) + stack.shape[-2:])
    if not np.isfinite(stack).all():
        raise PackageError("the test input contains NaN or infinite values")
    return np.ascontiguousarray(_crop(stack, (stack.shape[0],) + size))  # mirrored where it is smaller


def _crop(stack: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The centre ``shape`` of ``stack`` (the first frames in time), mirrored where it is smaller."""
    pad = [(0, max(0, s - n)) for s, n in zip(shape, stack.shape)]
    if any(after for _, after in pad):
        stack = np.pad(stack, pad, mode="symmetric")
    start = [0] + [(n - s) // 2 for s, n in zip(shape[1:], stack.shape[1:])]
    return stack[tuple(slice(a, a + s) for a, s in zip(start, shape))]


def _preprocess(x: np.ndarray, norm: Normalization) -> np.ndarray:
    """The declared preprocessing, computed as the spec defines it (``[B, T, 1, H, W]``)."""
    if norm.mode == "percentile":
        out = np.empty_like(x)
        for b in range(x.shape[0]):
            lo, hi = np.percentile(x[b].astype(np.float64), [norm.low, norm.high])
            out[b] = ((x[b] - lo) / (hi - lo + SCALE_RANGE_EPS)).astype(np.float32)
        return out
    if norm.mode == "fixed":
        gain, offset = _fixed_gain_offset(norm)
        return (x * np.float32(gain) + np.float32(offset)).astype(np.float32)
    return x.astype(np.float32)


def _postprocess(y: np.ndarray, norm: Normalization) -> np.ndarray:
    if norm.mode == "fixed":
        return (y * np.float32(norm.high - norm.low) + np.float32(norm.low)).astype(np.float32)
    return y.astype(np.float32)


def _fixed_gain_offset(norm: Normalization) -> tuple[float, float]:
    span = norm.high - norm.low
    return 1.0 / span, -norm.low / span


def _torchscript(model: CNNTDenoiser, example: np.ndarray, target: Path) -> bool:
    """Trace the network to TorchScript; False (and no file) if the trace fails or disagrees."""
    x = torch.from_numpy(example)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notices and tracer remarks
            traced = torch.jit.trace(model, x, check_trace=False)
            agree = torch.allclose(traced(x), model(x), atol=1e-5, rtol=1e-4)
            if agree:
                torch.jit.save(traced, str(target))
    except Exception:  # noqa: BLE001 - a model that does not trace is exported without TorchScript
        return False
    return agree


def _cover(raw: np.ndarray, output: np.ndarray, norm: Normalization, target: Path) -> None:
    """Noisy and denoised middle frame side by side (2:1), with the same contrast."""
    from PIL import Image

    t = raw.shape[0] // 2
    noisy = _preprocess(raw[None, :, None], norm)[0, t, 0] if norm.mode == "percentile" else raw[t]
    denoised = output[t]
    lo, hi = np.percentile(denoised, [0.5, 99.8])
    hi = hi if hi > lo else lo + 1
    panels = [np.clip((a - lo) / (hi - lo), 0, 1) for a in (noisy, denoised)]
    side = 256
    images = [Image.fromarray((p * 255).astype(np.uint8)).resize((side, side), Image.Resampling.NEAREST)
              for p in panels]
    cover = Image.new("L", (2 * side, side))
    for i, image in enumerate(images):
        cover.paste(image, (i * side, 0))
    cover.save(target)


def _environment() -> str:
    from .. import __version__

    torch_version = torch.__version__.split("+")[0]
    return (
        "name: napari-cnnt\n"
        "channels:\n  - conda-forge\n  - nodefaults\n"
        "dependencies:\n"
        "  - python>=3.10\n"
        f"  - pytorch>={torch_version}\n"
        "  - pip\n"
        "  - pip:\n"
        f"      - napari-cnnt>={__version__.split('+')[0]}\n"
    )


def _metric_lines(provenance: Mapping[str, Any]) -> list[str]:
    metrics = provenance.get("metrics") or {}
    evaluation = provenance.get("evaluation") or {}
    lines = []
    for key, label in (("val", "validation"), ("test", "test")):
        psnr, ssim = metrics.get(f"{key}_psnr"), metrics.get(f"{key}_ssim")
        if isinstance(psnr, (int, float)) and math.isfinite(psnr):
            where = evaluation.get("validation" if key == "val" else "test")
            lines.append(f"- {label}: PSNR {psnr:.2f} dB" + (f", SSIM {ssim:.4f}" if ssim is not None else "")
                         + (f" ({where})" if where else ""))
    return lines


def _documentation(model: CNNTDenoiser, title: str, provenance: Mapping[str, Any], torchscript: bool) -> str:
    from .. import __version__

    cfg, norm = model.config, model.normalization
    n_params = sum(p.numel() for p in model.parameters())
    split = provenance.get("training_data") if isinstance(provenance.get("training_data"), Mapping) else {}
    training = provenance.get("training") or {}
    if norm.mode == "percentile":
        scaling = (f"each stack is scaled by its {norm.low:g} and {norm.high:g} percentiles over time, y and x "
                   f"(`scale_range`); the output stays on that scale: multiply it by (p{norm.high:g} - p{norm.low:g}) "
                   f"of the input and add p{norm.low:g} to return to the input's units")
    elif norm.mode == "fixed":
        scaling = (f"intensities {norm.low:g} and {norm.high:g} map to 0 and 1 (`scale_linear`), and the output is "
                   "mapped back to the input's units")
    else:
        scaling = "the input is used as it is, already scaled to [0, 1]"
    lines = [
        f"# {title}",
        "",
        "CNNT (convolutional neural network transformer) denoiser for fluorescence time-lapse microscopy: "
        "a U-net whose blocks attend across time with convolutional attention "
        f"([arXiv 2404.04726]({CITATION['url']})). Exported by napari-cnnt {__version__}.",
        "",
        "## Inputs and outputs",
        "",
        "- `raw`: `[batch, time, channel, y, x]`, one channel, any number of frames; y and x multiples of "
        f"{cfg.size_multiple}" + (f" (exactly {cfg.height} x {cfg.width}: layer norm)" if cfg.norm_mode == "layer"
                                   else "") + f". It was trained on {cfg.time}-frame windows.",
        f"- Intensity scaling: {scaling}.",
        "- `denoised`: the same shape, float32.",
        "",
        "## Architecture",
        "",
        f"- {n_params:,} parameters; channels {list(cfg.blocks)}, {cfg.blocks_per_set} block(s) per level, "
        f"{cfg.n_head} attention heads, {cfg.norm_mode} norm, mixer {'on' if cfg.with_mixer else 'off'}, "
        f"{'causal' if cfg.is_causal else 'non-causal'} attention.",
        f"- `pytorch_state_dict`: `{ARCHITECTURE_MODULE}.{ARCHITECTURE_CALLABLE}(config=...)` from napari-cnnt "
        "(see `environment.yaml`)" + ("; `torchscript`: the same network, traced, needs only PyTorch." if torchscript
                                      else "."),
        "",
        "## Training",
        "",
    ]
    if provenance.get("base_model"):
        lines.append(f"- Fine-tuned from: {provenance['base_model']}")
    if split:
        lines.append(f"- Data: {len(split.get('train') or [])} training and {len(split.get('val') or [])} "
                     "validation samples" + ("; " + "; ".join(split["notes"]) if split.get("notes") else ""))
    for key in ("training_data", "training_source"):
        if isinstance(provenance.get(key), str):
            lines.append(f"- Data: {provenance[key]}")
    if training:
        loss = " + ".join(f"{w:g} {n}" for n, w in zip(training.get("loss", []), training.get("loss_weights", [])))
        lines.append(f"- Recipe: {training.get('epochs')} epochs, learning rate {training.get('lr')}, loss {loss}, "
                     f"patches {training.get('patch_sizes')} x {training.get('time')} frames, batch "
                     f"{training.get('batch_size')}, {training.get('optimizer')}, {training.get('scheduler')}")
    recipe = provenance.get("recipe") or {}
    for key, label in (("data", "Data made with"), ("command", "Trained with"), ("hardware", "Hardware"),
                       ("wall_time", "Wall time")):
        if recipe.get(key):
            lines.append(f"- {label}: `{recipe[key]}`" if key in ("data", "command") else f"- {label}: {recipe[key]}")
    if recipe.get("model_card"):
        lines.append(f"- Model card: {recipe['model_card']} in the napari-cnnt repository ({LINKS['git_repo']})")
    lines += [
        "",
        "## Validation",
        "",
        "PSNR in dB with the range (max - min) of each whole truth stack as the peak, the output unclipped "
        "(napari-cnnt's convention, docs/metrics.md); SSIM on the model's normalised scale.",
        "",
    ]
    lines += _metric_lines(provenance) or ["- No validation metrics were recorded for this model."]
    lines += [
        "",
        "Measure on a few pairs of your own microscope before trusting fine detail; denoised images can show "
        "structure that is not in the sample. Keep the raw data.",
        "",
        "## Citation",
        "",
        CITATION["text"],
        "",
        "## License",
        "",
        f"{LICENSE}, for the code and the weights alike.",
        "",
    ]
    return "\n".join(lines)


def _description(spec, model, folder, title, description, authors, provenance, torchscript) -> Any:
    from .. import __version__

    v = spec.v0_5
    cfg, norm = model.config, model.normalization
    m = cfg.size_multiple
    if cfg.norm_mode == "layer":
        y_size, x_size = cfg.height, cfg.width
    else:
        # the coarsest level needs more than one pixel per channel for its instance or batch norm
        y_size = x_size = v.ParameterizedSize(min=2 * m, step=m)
    data = v.IntervalOrRatioDataDescr(type="float32")
    pre = [v.EnsureDtypeDescr(kwargs=v.EnsureDtypeKwargs(dtype="float32"))]
    post = []
    if norm.mode == "percentile":
        pre.append(v.ScaleRangeDescr(kwargs=v.ScaleRangeKwargs(
            axes=[v.AxisId("time"), v.AxisId("y"), v.AxisId("x")], min_percentile=norm.low,
            max_percentile=norm.high, eps=SCALE_RANGE_EPS)))
    elif norm.mode == "fixed":
        gain, offset = _fixed_gain_offset(norm)
        pre.append(v.ScaleLinearDescr(kwargs=v.ScaleLinearKwargs(gain=gain, offset=offset)))
        post.append(v.ScaleLinearDescr(kwargs=v.ScaleLinearKwargs(gain=norm.high - norm.low, offset=norm.low)))
    raw_id, out_id = v.TensorId(INPUT_ID), v.TensorId(OUTPUT_ID)

    def ref(axis: str) -> Any:
        return v.SizeReference(tensor_id=raw_id, axis_id=v.AxisId(axis))

    inputs = [v.InputTensorDescr(
        id=raw_id,
        description="a fluorescence time-lapse stack in its recording's intensity units",
        axes=[v.BatchAxis(), v.TimeInputAxis(size=v.ParameterizedSize(min=1, step=1)),
              v.ChannelAxis(channel_names=[v.Identifier("fluorescence")]),
              v.SpaceInputAxis(id=v.AxisId("y"), size=y_size), v.SpaceInputAxis(id=v.AxisId("x"), size=x_size)],
        test_tensor=v.FileDescr(source=folder / "test_input.npy"),
        sample_tensor=v.FileDescr(source=folder / "sample_input.tif"),
        data=data,
        preprocessing=pre,
    )]
    outputs = [v.OutputTensorDescr(
        id=out_id,
        description=("denoised, in the input's units" if norm.mode == "fixed" else
                     "denoised, on the scale of the normalised input"),
        axes=[v.BatchAxis(), v.TimeOutputAxis(size=ref("time")),
              v.ChannelAxis(channel_names=[v.Identifier("denoised")]),
              v.SpaceOutputAxis(id=v.AxisId("y"), size=ref("y")), v.SpaceOutputAxis(id=v.AxisId("x"), size=ref("x"))],
        test_tensor=v.FileDescr(source=folder / "test_output.npy"),
        sample_tensor=v.FileDescr(source=folder / "sample_output.tif"),
        data=data,
        postprocessing=post,
    )]
    torch_version = v.Version(torch.__version__.split("+")[0])
    weights = {"pytorch_state_dict": v.PytorchStateDictWeightsDescr(
        source=folder / "weights.pt",
        architecture=v.ArchitectureFromLibraryDescr(
            import_from=ARCHITECTURE_MODULE, callable=v.Identifier(ARCHITECTURE_CALLABLE),
            kwargs={"config": cfg.to_dict()}),
        pytorch_version=torch_version,
        dependencies=v.FileDescr(source=folder / "environment.yaml"),
    )}
    if torchscript:
        weights["torchscript"] = v.TorchscriptWeightsDescr(
            source=folder / "weights_torchscript.pt", pytorch_version=torch_version, parent="pytorch_state_dict",
            comment="traced from the pytorch_state_dict weights with torch.jit.trace")
    training = provenance.get("training") or {}
    details = {
        "training_epochs": training.get("epochs"), "training_batch_size": training.get("batch_size"),
        "initial_learning_rate": training.get("lr"), "learning_rate_schedule": training.get("scheduler"),
        "loss_function": " + ".join(training.get("loss", [])) or None, "optimizer": training.get("optimizer"),
    }
    napari_cnnt = {
        "version": __version__,
        "config": cfg.to_dict(),
        "normalization": norm.to_dict(),
        "provenance": json.loads(json.dumps(provenance, default=_json_default)),
    }
    return v.ModelDescr(
        name=title,
        description=description or ("Denoises fluorescence time-lapse stacks (2-D + time, one channel) with "
                                     "CNNT, attention across time; exported by napari-cnnt."),
        authors=[v.Author(name=a) for a in authors],
        cite=[v.CiteEntry(text=CITATION["text"], doi=v.Doi(CITATION["doi"]), url=v.HttpUrl(CITATION["url"]))],
        license=v.LicenseId(LICENSE),
        git_repo=v.HttpUrl(LINKS["git_repo"]),
        documentation=v.FileDescr(source=folder / "README.md"),
        covers=[v.FileDescr(source=folder / "cover.png")],
        tags=["denoising", "fluorescence-light-microscopy", "time-lapse", "2d", "pytorch", "cnnt", "napari-cnnt"],
        inputs=inputs,
        outputs=outputs,
        weights=v.WeightsDescr(**weights),
        timestamp=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0),
        config=v.Config(bioimageio=v.BioimageioConfig(
            reproducibility_tolerance=[v.ReproducibilityTolerance(  # float32 on any CPU reproduces to 1e-4
                absolute_tolerance=REPRODUCE_TOLERANCE, relative_tolerance=REPRODUCE_TOLERANCE,
                mismatched_elements_per_million=0)],
            architecture_type="CNNT", task="denoising", modality="fluorescence time-lapse microscopy",
            model_parameter_count=sum(p.numel() for p in model.parameters()),
            training=v.TrainingDetails(**{k: val for k, val in details.items() if val is not None}),
        ), napari_cnnt=napari_cnnt),
    )


def _write(spec, descr, path: Path) -> None:
    """Save the package beside ``path`` and move it into place, so a failure leaves no partial package."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        with offline(spec), warnings.catch_warnings():
            # bioimageio.spec re-reads the package it wrote and warns about its own relative paths
            warnings.filterwarnings("ignore", message="Found mapping with 'source'")
            if path.suffix.lower() == ".zip":
                spec.save_zip(descr, output_path=tmp)
            else:
                spec.save_folder(descr, output_path=tmp)
        if path.is_dir():
            shutil.rmtree(path)
        tmp.replace(path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


# ----------------------------------------------------------------------------- reading
def load_package(path: str | Path) -> CNNTDenoiser:
    """The CNNT model of a bioimage.io package written by napari-cnnt (or any package whose
    ``pytorch_state_dict`` architecture is napari-cnnt's ``CNNTDenoiser``).

    Only the state dict is read (``torch.load(weights_only=True)``, after its
    SHA-256 is checked against the description); no code from the package runs.
    """
    from .checkpoint import CheckpointError, _build, _check_shapes

    path = Path(path)
    try:
        spec = _spec()
    except PackageError as e:
        raise CheckpointError(f"{path}: a bioimage.io model package; {e}") from None
    with offline(spec):
        descr = spec.load_description(path, perform_io_checks=False, format_version="latest")
    if not isinstance(descr, spec.v0_5.ModelDescr):
        summary = getattr(descr, "validation_summary", None)
        errors = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in (summary.errors if summary else [])[:3])
        raise CheckpointError(f"{path}: not a valid bioimage.io model description ({errors or type(descr).__name__})")
    weights = descr.weights.pytorch_state_dict
    arch = getattr(weights, "architecture", None)
    if weights is None or not isinstance(arch, spec.v0_5.ArchitectureFromLibraryDescr) or (
            arch.import_from, str(arch.callable)) != (ARCHITECTURE_MODULE, ARCHITECTURE_CALLABLE):
        found = f"{arch.import_from}.{arch.callable}" if isinstance(arch, spec.v0_5.ArchitectureFromLibraryDescr) \
            else "no napari-cnnt architecture" if weights is not None else "no pytorch_state_dict weights"
        raise CheckpointError(f"{path}: a bioimage.io model, but not a CNNT model of napari-cnnt ({found})")
    try:
        config = CNNTConfig.from_dict(dict(arch.kwargs["config"]))
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: the architecture's configuration cannot describe a CNNT model ({e})") from None
    try:
        data = spec.get_reader(weights).read()  # checks the SHA-256 the description records
    except (OSError, ValueError) as e:
        damaged = "sha256" in str(e).lower()
        problem = ("the weights file does not match its SHA-256 in the description (damaged)" if damaged
                   else f"cannot read the weights file ({e})")
        raise CheckpointError(f"{path}: {problem}") from None
    if weights.sha256 is not None and hashlib.sha256(data).hexdigest() != str(weights.sha256):
        raise CheckpointError(f"{path}: the weights file does not match its SHA-256 in the description (damaged)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for the same problems
        raise CheckpointError(f"{path}: unreadable pytorch_state_dict weights ({str(e).splitlines()[0]})") from None
    if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: the pytorch_state_dict weights are not a state dict")
    _check_shapes(path, config, {k: tuple(v.shape) for k, v in state.items()})
    model = _build(path, config, state)
    extra = (descr.config.model_extra or {}).get("napari_cnnt") or {}
    try:
        model.normalization = (Normalization.from_dict(extra["normalization"]) if "normalization" in extra
                               else _normalization_from(descr.inputs[0].preprocessing))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the input's intensity scaling cannot be read ({e})") from None
    model.metadata = {**(extra.get("provenance") or {}), "source": "bioimage.io package", "file": path.name}
    return model


def _normalization_from(steps: Sequence[Any]) -> Normalization:
    """napari-cnnt's normalisation from a package's preprocessing (for packages written elsewhere)."""
    for step in steps:
        if step.id == "scale_range":
            return Normalization("percentile", step.kwargs.min_percentile, step.kwargs.max_percentile)
        if step.id == "scale_linear":
            gain, offset = float(step.kwargs.gain), float(step.kwargs.offset)
            return Normalization("fixed", -offset / gain, (1 - offset) / gain)
    return Normalization.none()
