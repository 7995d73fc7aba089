"""Reading and writing CNNT model files without ever executing code from them.

Two formats are read:

- napari-cnnt's own: one safetensors file whose header carries the model
  configuration, the intensity normalisation and the provenance as JSON;
- the reference implementation's: a bare state dict (``.pt``) with the run's
  JSON configuration beside it (same stem) or given explicitly. Its
  ``attn.mask`` buffers are constants and are dropped.

Nothing in a file is trusted before it is checked: the safetensors header
entry by entry, the configuration's types, the configuration against the
shapes of the file's tensors (on torch's ``meta`` device, which allocates
nothing, so a file cannot make napari-cnnt build a huge network), and the
weights for NaN and infinity. Every problem is one :class:`CheckpointError`.

Only napari-cnnt's format is written here (through
:func:`napari_cnnt.io.atomic.write_bytes`); bioimage.io model packages are
written and read by ``bioimageio.py``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..io import formats as image_formats
from ..io.atomic import write_bytes
from ..normalization import Normalization
from .config import CNNTConfig, ConfigError
from .denoiser import CNNTDenoiser

FORMAT_NAME = "napari-cnnt"
FORMAT_VERSION = 1
BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "backbone.safetensors"


# safetensors' data types and their sizes in bytes.
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


# ----------------------------------------------------------------------------- loading
def load_model(
    path: str | os.PathLike | None = None,
    config: CNNTConfig | Mapping[str, Any] | str | os.PathLike | None = None,
) -> CNNTDenoiser:
    """Load a CNNT denoiser in eval mode on the CPU.

    Parameters
    ----------
    path
        A napari-cnnt model file, a reference checkpoint (state-dict
        ``.pt``), or a bioimage.io model package of a CNNT model (zip file,
        folder or its ``rdf.yaml``). ``None`` loads the model bundled with
        the package.
    config
        Only for reference checkpoints: their run configuration as a dict,
        a :class:`CNNTConfig` or the path of the JSON file. By default the
        JSON file with the checkpoint's stem is used.
    """
    if path is None:
        if not BUNDLED_WEIGHTS.is_file():
            raise CheckpointError(
                "this installation of napari-cnnt has no bundled model weights yet; "
                "pass the path of a model file to load_model(path)"
            )
        path = BUNDLED_WEIGHTS
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model file")
    from . import bioimageio

    if bioimageio.is_package(path):
        if config is not None:
            raise CheckpointError(f"{path}: bioimage.io packages carry their own configuration; do not pass config=")
        return bioimageio.load_package(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a model file")

    kind = _sniff(path)
    if kind == "safetensors":
        if config is not None:
            raise CheckpointError(f"{path}: napari-cnnt model files carry their own configuration; do not pass config=")
        return _load_native(path)
    if kind == "torch":
        return _load_reference(path, config)
    raise CheckpointError(
        f"{path}: not a CNNT model file (neither a napari-cnnt model nor a PyTorch state dict)"
    )


def _sniff(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(head) < 9:
        raise CheckpointError(f"{path}: not a CNNT model file (only {len(head)} bytes)")
    if len(head) >= 9:  # first: a safetensors header length can start with the pickle byte 0x80
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < 100_000_000:
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"  # zip archive (torch >= 1.6) or legacy pickle stream
    return "unknown"


def _load_native(path: Path) -> CNNTDenoiser:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = _read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: a safetensors file, but not a napari-cnnt model (no napari-cnnt header)")
    try:
        version = int(meta.get("format_version", "0"))
    except (TypeError, ValueError):
        version = -1
    if version < 1 or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: model file format version {meta.get('format_version')!r} is not supported "
            f"by this napari-cnnt (reads version {FORMAT_VERSION}); update napari-cnnt"
        )
    try:
        config = CNNTConfig.from_json(meta["config"])
        normalization = Normalization.from_dict(json.loads(meta["normalization"]))
        provenance = json.loads(meta.get("provenance", "{}"))
        if not isinstance(provenance, dict):
            raise TypeError("provenance is not a JSON object")
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged model header ({e})") from None
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    _check_shapes(path, config, shapes)  # before any tensor is read or any module built
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted model file ({_first_line(e)})") from None
    model = _build(path, config, state)
    model.normalization = normalization
    model.metadata = provenance
    return model


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """The header, every tensor entry checked: a known type, a shape of whole numbers, and
    data offsets that lie in the file and hold exactly that many bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated model file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated model file (header runs past the end of the file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupted model file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted model file (unreadable header)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupted model file (its metadata are not text)")
    data_end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        bad = f"{path}: corrupted model file (tensor {key!r}: "
        if not isinstance(entry, dict):
            raise CheckpointError(bad + "not a tensor description)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ST_DTYPES:
            raise CheckpointError(bad + f"unknown data type {dtype!r})")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(bad + f"shape {shape!r} is not a list of sizes)")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(bad + f"data_offsets {offsets!r} are not two increasing byte offsets)")
        if offsets[1] - offsets[0] != math.prod(shape) * _ST_DTYPES[dtype]:
            raise CheckpointError(bad + f"shape {shape} does not match its {offsets[1] - offsets[0]} bytes)")
        data_end = max(data_end, offsets[1])
    if 8 + n + data_end > size:
        raise CheckpointError(
            f"{path}: truncated model file ({size} bytes, the header announces {8 + n + data_end})"
        )
    return header


def _load_reference(path: Path, config: Any) -> CNNTDenoiser:
    run = _reference_run_config(path, config)
    try:
        cfg = run if isinstance(run, CNNTConfig) else _config_from_mapping(run)
        normalization = _reference_normalization(run) if isinstance(run, Mapping) else None
    except (ConfigError, TypeError, ValueError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: its configuration cannot describe a CNNT model ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as e:  # noqa: BLE001 - torch raises several types for the same problems
        text = str(e)
        if "Weights only load failed" in text or ("Unsupported" in text and "global" in text):
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors; refusing to load it because "
                "that would execute code from the file"
            ) from None
        # torch's own advice (to load without weights_only) would execute code from the file: never pass it on.
        reason = _first_line(e) if "weights_only" not in text else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({reason})") from None
    state = _unwrap_state_dict(path, obj)
    state = {k: v for k, v in state.items() if not k.endswith("attn.mask")}
    _check_shapes(path, cfg, {k: tuple(v.shape) for k, v in state.items()})
    model = _build(path, cfg, state)
    if normalization is not None:
        model.normalization = normalization
    model.metadata = {"source": "reference checkpoint", "file": path.name}
    return model


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _reference_run_config(path: Path, config: Any) -> CNNTConfig | Mapping[str, Any]:
    if isinstance(config, (CNNTConfig, Mapping)):
        return config
    json_path = Path(config) if config is not None else path.with_suffix(".json")
    if not json_path.is_file():
        raise CheckpointError(
            f"{path}: a reference checkpoint needs its run configuration; expected {json_path} "
            "or pass config= (a dict or the path of the JSON file)"
        )
    try:
        run = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{json_path}: not valid JSON ({_first_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"{json_path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(run, dict):
        raise CheckpointError(f"{json_path}: expected a JSON object with the run configuration")
    return run


def _config_from_mapping(run: Mapping[str, Any]) -> CNNTConfig:
    from dataclasses import fields

    names = {f.name for f in fields(CNNTConfig)}
    if set(run) <= names:
        return CNNTConfig.from_dict(dict(run))
    return CNNTConfig.from_reference(dict(run))


def _reference_normalization(run: Mapping[str, Any]) -> Normalization:
    per_scaling = run.get("per_scaling")
    if per_scaling not in (None, True, False, 0, 1):
        raise ConfigError(f"per_scaling must be true or false, got {per_scaling!r}")
    scale = run.get("im_value_scale") or None
    if scale is not None and (not isinstance(scale, (list, tuple)) or len(scale) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)):
        raise ConfigError(f"im_value_scale must be two numbers, got {scale!r}")
    return Normalization.reference(bool(per_scaling), scale)


def _unwrap_state_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model_state_dict", "state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: a PyTorch file, but not a state dict of a CNNT model")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _check_shapes(path: Path, config: CNNTConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The configuration must describe exactly the file's tensors. Checked on a network built
    on the ``meta`` device (shapes only, no memory), after bounding what that network can be:
    no more blocks than the file has tensors, no channel count larger than any of its tensors."""
    sets = 2 * config.levels - 1
    largest = max((max(s) for s in shapes.values() if s), default=0)
    if config.blocks_per_set * sets > len(shapes) or max(config.blocks + config.pre_channels) > largest:
        raise CheckpointError(
            f"{path}: weights do not match the configuration blocks={list(config.blocks)}, "
            f"blocks_per_set={config.blocks_per_set}: the file holds {len(shapes)} tensors, none with more "
            f"than {largest} channels"
        )
    if config.norm_mode == "layer" and config.height * config.width > largest * largest:
        raise CheckpointError(f"{path}: weights do not match the configuration's patch of "
                              f"{config.height} x {config.width}")
    with torch.device("meta"):
        skeleton = CNNTDenoiser(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if not k.endswith("attn.mask")}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{path}: weights do not match the configuration blocks={list(config.blocks)}, "
            f"blocks_per_set={config.blocks_per_set}, norm_mode={config.norm_mode!r}: "
            + ", ".join(parts)
        )
    for k, shape in expected.items():
        if tuple(shapes[k]) != shape:
            raise CheckpointError(
                f"{path}: weight {k} has shape {list(shapes[k])} but the configuration needs {list(shape)}"
            )


def _build(path: Path, config: CNNTConfig, state: Mapping[str, torch.Tensor]) -> CNNTDenoiser:
    """The network with the file's weights, which :func:`_check_shapes` has matched to ``config``;
    the weights must be finite numbers."""
    for k, v in state.items():
        if not (v.is_floating_point() or v.is_complex()):
            continue
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: weight {k} holds NaN or infinite values; the model cannot denoise")
    model = CNNTDenoiser(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- saving
FORMATS = (FORMAT_NAME, "bioimageio")


def save_model(
    model: nn.Module, path: str | os.PathLike, *, format: str = FORMAT_NAME, overwrite: bool = False,
    **metadata: Any,
) -> Path:
    """Write ``model`` to ``path``, atomically; returns the path written.

    An existing ``path`` is refused unless ``overwrite``; a path whose suffix
    is that of an image or training file (``.tif``, ``.h5``) is always refused.

    ``format="napari-cnnt"`` writes one safetensors file; ``"bioimageio"``
    a bioimage.io model package, a zip file if ``path`` ends in ``.zip``,
    else a folder (``napari_cnnt.model.bioimageio.save_package`` also takes
    the package's name, authors and test data). Keyword arguments are added
    to the model's provenance (for example ``base_model``, ``training_data``,
    ``epochs``, ``metrics``); values must be JSON-serialisable.
    """
    from safetensors.torch import save as st_save

    if not isinstance(model, CNNTDenoiser):
        raise TypeError(f"save_model expects a CNNTDenoiser, got {type(model).__name__}")
    path = Path(path)
    if path.name.lower().endswith(_DATA_SUFFIXES):
        raise CheckpointError(f"{path}: refusing to write a model over a name for image data; "
                              "use a .safetensors (or .zip) name")
    provenance = provenance_of(model, **metadata)
    if format == "bioimageio":
        from .bioimageio import save_package

        return save_package(model, path, provenance, overwrite=overwrite)
    if format != FORMAT_NAME:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": model.config.to_json(),
        "normalization": json.dumps(model.normalization.to_dict()),
        "provenance": json.dumps(provenance, default=_json_default),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, st_save(tensors, metadata=header), overwrite=overwrite, error=CheckpointError)


# Image files a model must never be written over: the formats napari-cnnt reads, and other common ones.
_DATA_SUFFIXES = tuple(s for f in image_formats.FORMATS for s in f.suffixes) + (".npy", ".png", ".jpg", ".czi", ".nd2")


def provenance_of(model: CNNTDenoiser, **metadata: Any) -> dict[str, Any]:
    """What a saved model records about itself: its metadata, ``metadata``, the time and the versions."""
    from .. import __version__

    provenance = dict(getattr(model, "metadata", {}) or {})
    provenance.update(metadata)
    provenance.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    provenance["napari_cnnt_version"] = __version__
    provenance["torch_version"] = torch.__version__
    return provenance


def atomic_write(path: str | os.PathLike, payload: bytes) -> Path:
    """Replace ``path`` (creating its folder) with ``payload``, atomically: for files that a run
    rewrites by design (its training checkpoint, its metrics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, payload, overwrite=True, error=CheckpointError)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()  # numpy and torch scalars
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"metadata value {obj!r} is not JSON-serialisable")
