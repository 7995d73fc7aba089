"""Reading and writing CNNT model files without ever executing code from them.

Two formats are read:

- napari-cnnt's own: one safetensors file whose header carries the model
  configuration, the intensity normalisation and the provenance as JSON;
- the reference implementation's: a bare state dict (``.pt``) with the run's
  JSON configuration beside it (same stem) or given explicitly. Its
  ``attn.mask`` buffers are constants and are dropped.

Only napari-cnnt's format is written here, atomically (temporary file, then
rename); bioimage.io model packages are written and read by ``bioimageio.py``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..normalization import Normalization
from .config import CNNTConfig, ConfigError
from .denoiser import CNNTDenoiser

FORMAT_NAME = "napari-cnnt"
FORMAT_VERSION = 1
BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "backbone.safetensors"


class CheckpointError(ValueError):
    """A model file that cannot be used, with the file and the reason in the message."""


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
    with open(path, "rb") as f:
        head = f.read(16)
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
    except ValueError:
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
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged model header ({e})") from None
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted model file ({e})") from None
    model = _build(path, config, state)
    model.normalization = normalization
    model.metadata = provenance
    return model


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated model file (header runs past the end of the file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupted model file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted model file (unreadable header)")
    data_end = max(
        (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)),
        default=0,
    )
    if 8 + n + data_end > size:
        raise CheckpointError(
            f"{path}: truncated model file ({size} bytes, the header announces {8 + n + data_end})"
        )
    return header


def _load_reference(path: Path, config: Any) -> CNNTDenoiser:
    run = _reference_run_config(path, config)
    try:
        cfg = run if isinstance(run, CNNTConfig) else _config_from_mapping(run)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: its configuration cannot describe a CNNT model ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for the same problems
        text = str(e)
        if "Weights only load failed" in text or ("Unsupported" in text and "global" in text):
            raise CheckpointError(
                f"{path}: holds Python objects besides tensors; refusing to load it because "
                "that would execute code from the file"
            ) from None
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({text.splitlines()[0]})") from None
    state = _unwrap_state_dict(path, obj)
    state = {k: v for k, v in state.items() if not k.endswith("attn.mask")}
    model = _build(path, cfg, state)
    if isinstance(run, Mapping):
        model.normalization = _reference_normalization(run)
    model.metadata = {"source": "reference checkpoint", "file": path.name}
    return model


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
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{json_path}: not valid JSON ({e})") from None
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
    return Normalization.reference(bool(run.get("per_scaling")), run.get("im_value_scale"))


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


def _build(path: Path, config: CNNTConfig, state: Mapping[str, torch.Tensor]) -> CNNTDenoiser:
    model = CNNTDenoiser(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
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
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: weight {k} has shape {list(state[k].shape)} but the configuration needs {list(v.shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- saving
FORMATS = (FORMAT_NAME, "bioimageio")


def save_model(model: nn.Module, path: str | os.PathLike, *, format: str = FORMAT_NAME, **metadata: Any) -> Path:
    """Write ``model`` to ``path``, atomically; returns the path written.

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
    provenance = provenance_of(model, **metadata)
    if format == "bioimageio":
        from .bioimageio import save_package

        return save_package(model, path, provenance)
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
    return atomic_write(path, st_save(tensors, metadata=header))


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
    """Write ``payload`` to ``path`` so that readers see the old file or the new one, never a mix.

    The bytes go to a temporary file in the same folder, are flushed to
    disk, and the temporary file is renamed over ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes owner-only files; a model file is an ordinary one
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()  # numpy and torch scalars
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"metadata value {obj!r} is not JSON-serialisable")
