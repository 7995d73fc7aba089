"""Hostile and careless input: the cases, and how an attempt is judged.

Each :class:`Case` builds its files in a fresh folder, then does what a
careless or hostile user would (through the library, the command line run
in-process, or a subprocess for what may take all memory or a signal). An
attempt ends in one of:

- ``clear``: refused with one line that names the file or the setting (or,
  for cases with a right answer, the right answer);
- ``unclear``: refused, but with a traceback, several lines, no file name,
  or torch's advice to load files unsafely;
- ``crash``: the process died, hung or ran past its memory cap;
- ``lost``: an existing file changed, something was left behind, or a
  wrong result came back without a word.

Only public names that exist in every version of the package are used, so
``benchmarks/hostile_count.py`` can run the same cases against an older
source tree. Files are generated here; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = {
    1: "full disk / failing writes",
    2: "overwriting files",
    3: "huge declared shapes",
    4: "model files",
    5: "training settings",
    6: "data outside the file",
    7: "SIGTERM",
    8: "silent garbage",
    9: "unclear messages",
}
MEMORY_CAP = 3 << 30  # bytes of address space for memory-risky cases
SUBPROCESS_TIMEOUT = 60
FORBIDDEN = ("weights_only", "Traceback", "refused the file")  # torch's unsafe advice; napari's reasonless refusal


# ----------------------------------------------------------------------------- results
@dataclass
class Result:
    """What an attempt did: an exception, a command's exit status and stderr, or a value."""

    error: BaseException | None = None
    rc: int | None = None
    stderr: str = ""
    value: Any = None
    crashed: str = ""  # why the process died or hung


@dataclass
class Case:
    name: str
    klass: int
    setup: Callable[[Path], dict]  # builds files; returns context for run (and "protect", "names", "allow")
    run: Callable[[Path, dict], Result]
    expect: str = ""  # regex the message (or, with a value, the judgement) must match in this version
    good: Callable[[Any, dict], bool] | None = None  # for cases with a right answer
    needs_mount: bool = False

    @property
    def id(self) -> str:
        return f"{self.klass}-{self.name}"


@dataclass
class Verdict:
    outcome: str
    message: str
    details: list[str] = field(default_factory=list)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def message_of(result: Result) -> str:
    if result.error is not None:
        return str(result.error)
    lines = [ln for ln in result.stderr.splitlines()
             if ln.startswith("napari-cnnt ") or "error:" in ln or "Traceback" in ln]
    return "\n".join(lines) if lines else result.stderr.strip()


def judge(case: Case, result: Result, ctx: dict, before: dict[str, str], files_before: set[str],
          folder: Path) -> Verdict:
    """Classify one attempt (see the module docstring)."""
    details = []
    for name, sha in before.items():
        p = folder / name
        if not p.exists() or digest(p) != sha:
            details.append(f"{name} changed")
    left = listing(folder) - files_before - set(ctx.get("allow", ()))
    left = {n for n in left if not any(n.startswith(a) for a in ctx.get("allow", ()))}
    if left:
        details.append(f"left behind: {sorted(left)}")
    text = message_of(result)
    if details:
        return Verdict("lost", text, details)
    if result.crashed:
        return Verdict("crash", result.crashed)
    if case.good is not None and result.error is None and result.rc in (None, 0):
        return Verdict("clear" if case.good(result.value, ctx) else "lost", repr(result.value)[:200])
    if result.error is None and result.rc in (None, 0):
        return Verdict("lost", "no error: the attempt went through")
    if result.rc is not None and result.rc < 0:
        return Verdict("crash", f"killed by signal {-result.rc}")
    one_line = len(text.strip().splitlines()) == 1
    names = ctx.get("names", ())
    named = not names or any(n in text for n in names)
    if result.error is not None:
        kind_ok = isinstance(result.error, (ValueError, TypeError))
    else:
        kind_ok = result.rc in (1, 2, 130) and "Traceback" not in result.stderr
    if kind_ok and one_line and named and not any(w in text for w in FORBIDDEN):
        return Verdict("clear", text)
    why = [w for w, bad in (("not one line", not one_line), ("no file named", not named),
                            (f"{type(result.error).__name__}", not kind_ok)) if bad]
    return Verdict("unclear", text, why)


def attempt(case: Case, folder: Path) -> tuple[Verdict, Result]:
    ctx = case.setup(folder) or {}
    protect = ctx.get("protect", ())
    before = {name: digest(folder / name) for name in protect}
    files_before = listing(folder)
    try:
        result = case.run(folder, ctx)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        result = Result(error=e)
    return judge(case, result, ctx, before, files_before, folder), result


# ----------------------------------------------------------------------------- running things
def call(fn: Callable, *args: Any, **kwargs: Any) -> Result:
    try:
        return Result(value=fn(*args, **kwargs))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001
        return Result(error=e)


def cli(*argv: Any) -> Result:
    """``napari-cnnt ARGV`` in this process: exit status and stderr."""
    from napari_cnnt.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = int(e.code or 0)
        except Exception as e:  # noqa: BLE001 - an uncaught exception is what the user would see
            import traceback

            traceback.print_exc(file=err)
            return Result(rc=99, stderr=err.getvalue(), error=e)
    return Result(rc=rc, stderr=err.getvalue())


def python(code: str, cwd: Path, cap: int | None = MEMORY_CAP, timeout: float = SUBPROCESS_TIMEOUT) -> Result:
    """``code`` in a fresh interpreter under a memory cap; it prints its outcome as JSON on the last line."""
    prelude = textwrap.dedent(f"""
        import json, resource, sys, traceback
        if {cap!r}:
            resource.setrlimit(resource.RLIMIT_AS, ({cap!r}, {cap!r}))
        def report(error=None, value=None):
            print(json.dumps({{"type": type(error).__name__ if error else None, "message": str(error) if error
                               else "", "bases": [c.__name__ for c in type(error).__mro__] if error else [],
                               "value": value}}))
    """)
    body = "try:\n" + textwrap.indent(textwrap.dedent(code), "    ") + (
        "\nexcept MemoryError as e:\n    print('MEMORY'); sys.exit(3)\n"
        "except Exception as e:\n    report(e)\nelse:\n    report(None, locals().get('value'))\n")
    try:
        proc = subprocess.run([sys.executable, "-c", prelude + body], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return Result(crashed=f"still running after {timeout} s")
    if proc.returncode == 3 or "MemoryError" in proc.stderr or "MEMORY" in proc.stdout:
        return Result(crashed="ran out of its memory cap")
    if proc.returncode != 0:
        return Result(crashed=f"exit status {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["type"] is None:
        return Result(value=out["value"])
    base = ValueError if "ValueError" in out["bases"] else TypeError if "TypeError" in out["bases"] else RuntimeError
    error = type(out["type"], (base,), {})(out["message"])
    return Result(error=error)


# ----------------------------------------------------------------------------- files
RNG = np.random.default_rng(15)


def stack(shape=(4, 32, 32), dtype=np.uint16) -> np.ndarray:
    return RNG.integers(100, 1000, size=shape).astype(dtype)


def tif(path: Path, data: np.ndarray | None = None) -> Path:
    import tifffile

    tifffile.imwrite(path, stack() if data is None else data)
    return path


def h5(path: Path, data: np.ndarray | None = None, key: str = "x") -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=stack() if data is None else data)
    return path


def pairs(path: Path, n: int = 3, shape=(8, 32, 32)) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        for i in range(n):
            g = f.create_group(f"s{i}")
            clean = stack(shape).astype(np.float32)
            g["noisy_im"] = clean + RNG.normal(0, 50, shape).astype(np.float32)
            g["clean_im"] = clean
    return path


def bundled() -> Path:
    from napari_cnnt.model.checkpoint import BUNDLED_WEIGHTS

    return Path(BUNDLED_WEIGHTS)


def bundled_parts() -> tuple[dict, dict, bytes]:
    """The bundled model's header metadata, tensor entries and data bytes."""
    raw = bundled().read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    return meta, header, raw[8 + n:]


def safetensors_file(path: Path, meta: dict | None = None, entries: dict | None = None, data: bytes | None = None,
                     raw_header: bytes | None = None) -> Path:
    m, e, d = bundled_parts()
    header = dict(entries if entries is not None else e)
    header["__metadata__"] = meta if meta is not None else m
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + (d if data is None else data))
    return path


def with_config(path: Path, **changes: Any) -> Path:
    meta, _, _ = bundled_parts()
    config = json.loads(meta["config"])
    config.update(changes)
    return safetensors_file(path, meta={**meta, "config": json.dumps(config)})


def reference_pt(path: Path, run: dict | None = None, *, nan: bool = False, mixer: bool = True) -> Path:
    import torch

    from napari_cnnt.model.checkpoint import load_model

    model = load_model()
    state = model.state_dict()
    if nan:
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, path)
    config = model.config.to_dict()
    config.update(run or {})
    path.with_suffix(".json").write_text(json.dumps(config))
    return path


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "1m"):
    """A small file system at ``folder/full`` (needs root and a kernel that allows it)."""
    target = folder / "full"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], check=True,
                   capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def can_mount() -> str:
    """Empty if a tmpfs can be mounted here, else why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True, text=True)
        if r.returncode:
            return f"cannot mount a tmpfs: {r.stderr.strip()}"
        subprocess.run(["umount", d], capture_output=True)
    return ""


# ----------------------------------------------------------------------------- the cases
CASES: list[Case] = []


def case(klass: int, expect: str = "", good: Callable | None = None, needs_mount: bool = False):
    def register(fn: Callable) -> Callable:
        setup, run = fn()
        CASES.append(Case(fn.__name__, klass, setup, run, expect, good, needs_mount))
        return fn
    return register


# 1. Writes that cannot half-succeed -------------------------------------------------------
def _full_disk(writer: str):
    def setup(d):
        return {"protect": [], "names": ["out"], "allow": ["full"]}

    def run(d, ctx):
        with tmpfs(d) as full:
            (full / "keep.h5").write_bytes(b"keep" * 100)
            before = listing(full), digest(full / "keep.h5")
            data = RNG.random((16, 256, 128), dtype=np.float32)
            r = call(_WRITERS[writer], full, data)
            after = listing(full), digest(full / "keep.h5")
            if r.error is None or before != after:
                r = Result(value={"error": repr(r.error), "before": sorted(before[0]), "after": sorted(after[0])})
            return r
    return setup, run


def _write_h5(folder: Path, data):
    from napari_cnnt.io import hdf5

    hdf5.write_hdf5(folder / "out.h5", "x", data)


def _write_tif(folder: Path, data):
    from napari_cnnt.io import tiff

    tiff.write_tiff(folder / "out.tif", data)


def _write_model(folder: Path, data):
    from napari_cnnt.model.checkpoint import load_model, save_model

    model = load_model()
    (folder / "pad").write_bytes(b"\0" * (1_000_000 - 400_000))  # leave less room than the model needs
    try:
        save_model(model, folder / "out.safetensors")
    finally:
        (folder / "pad").unlink()


def _write_cli(folder: Path, data):
    import tifffile

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.tif"
        tifffile.imwrite(src, (data * 1000).astype(np.uint16))
        r = cli("denoise", src, "-o", folder / "out.h5", "--device", "cpu")
    if r.rc == 0:
        return
    raise type("CLIError", (ValueError,), {})(message_of(r))


_WRITERS = {"hdf5": _write_h5, "tiff": _write_tif, "model": _write_model, "cli": _write_cli}
for _w, _expect in (("hdf5", "out.h5: could not be written"), ("tiff", "out.tif: could not be written: the disk is "
                                                                          "full"),
                    ("model", "out.safetensors: could not be written: the disk is full"),
                    ("cli", "out.h5: could not be written")):
    def _make(w=_w):
        return _full_disk(w)
    _make.__name__ = f"full_disk_{_w}"
    case(1, _expect, needs_mount=True)(_make)


def _failing(patch: str):
    """A writer whose writes fail (or silently drop a frame) part-way, over an existing file."""
    def setup(d):
        h5(d / "out.h5", stack((16, 32, 32)))
        tif(d / "out.tif", stack((16, 32, 32)))
        return {"protect": ["out.h5", "out.tif"], "names": ["out."]}

    def run(d, ctx):
        import h5py
        import tifffile

        from napari_cnnt.io import hdf5, tiff

        data = stack((16, 32, 32))
        calls = {"n": 0}
        if patch == "h5_setitem":
            original = h5py.Dataset.__setitem__

            def broken(self, key, value):
                calls["n"] += 1
                if calls["n"] == 5:
                    raise OSError(28, "No space left on device")
                return original(self, key, value)
            target, name = h5py.Dataset, "__setitem__"
        elif patch == "h5_silent":
            original = h5py.Dataset.__setitem__

            def broken(self, key, value):  # a disk that drops data without an error
                calls["n"] += 1
                if calls["n"] in (7, 8):
                    return None
                return original(self, key, value)
            target, name = h5py.Dataset, "__setitem__"
        elif patch == "tiff_write":
            original = tifffile.FileHandle.write

            def broken(self, data):
                calls["n"] += 1
                if calls["n"] > 3:
                    raise OSError(28, "No space left on device")
                return original(self, data)
            target, name = tifffile.FileHandle, "write"
        else:  # fsync
            original = os.fsync

            def broken(fd):
                raise OSError(5, "Input/output error")
            target, name = os, "fsync"
        setattr(target, name, broken)
        try:
            # An existing output: the call refuses it (then nothing is written) or must leave it intact.
            kwargs = {"overwrite": True} if _accepts_overwrite() else {}
            if patch.startswith("tiff"):
                return call(tiff.write_tiff, d / "out.tif", data, **kwargs)
            return call(hdf5.write_hdf5, d / "out.h5", "x", data, **kwargs)
        finally:
            setattr(target, name, original)
    return setup, run


def _accepts_overwrite() -> bool:
    import inspect

    from napari_cnnt.io import hdf5

    return "overwrite" in inspect.signature(hdf5.write_hdf5).parameters


for _p, _expect in (("h5_setitem", "out.h5: could not be written: the disk is full"),
                    ("h5_silent", "out.h5: could not be written: dataset 'x' reads back differently"),
                    ("tiff_write", "out.tif: could not be written: the disk is full"),
                    ("fsync", "out.h5: could not be written: input/output error")):
    def _make(p=_p):
        return _failing(p)
    _make.__name__ = f"failing_{_p}"
    case(1, _expect)(_make)


# 2. Explicit overwrite -------------------------------------------------------------------
def _existing(*files: str, names=()):
    def setup(d):
        for f in files:
            if f.endswith((".h5",)):
                pairs(d / f) if "pairs" in f else h5(d / f)
            elif f.endswith(".tif"):
                tif(d / f)
            elif f.endswith(".safetensors"):
                (d / f).write_bytes(bundled().read_bytes())
        return {"protect": list(files), "names": list(names or files)}
    return setup


TRAIN_FAST = ["--num_epochs", "1", "--steps_per_epoch", "1", "--batch_size", "1", "--time", "4", "--height", "32",
              "--width", "32", "--device", "cpu", "--ratio", "60", "20", "20"]


def _logs(d: Path) -> list[str]:
    return ["--model_path", d / "logs", "--check_path", d / "logs", "--result_path", d / "logs", "--log_path",
            d / "logs"]


@case(2, r"pairs\.h5: refusing to overwrite the input")
def finetune_over_its_training_file():
    def run(d, ctx):
        return cli("finetune", "--h5files", d / "pairs.h5", "-o", d / "pairs.h5", *TRAIN_FAST, *_logs(d))
    s = _existing("pairs.h5")
    return (lambda d: {**s(d), "allow": ["logs"]}), run


@case(2, r"image\.tif: (already exists|refusing)")
def train_over_an_image():
    def run(d, ctx):
        return cli("train", "--h5files", d / "pairs.h5", "-o", d / "image.tif", "--preset", "small", *TRAIN_FAST,
                   *_logs(d))
    s = _existing("pairs.h5", "image.tif", names=["image.tif"])
    return (lambda d: {**s(d), "allow": ["logs"]}), run


@case(2, r"image\.tif: refusing to write a model over a name for image data")
def save_model_over_a_tiff():
    def run(d, ctx):
        from napari_cnnt.model.checkpoint import load_model, save_model

        return call(save_model, load_model(), d / "image.tif")
    return _existing("image.tif"), run


@case(2, r"m\.safetensors: already exists")
def save_model_over_a_model():
    def run(d, ctx):
        from napari_cnnt.model.checkpoint import load_model, save_model

        (d / "m.safetensors").write_bytes(b"an older model")
        ctx["protect"] = []
        return call(save_model, load_model(), d / "m.safetensors")

    def setup(d):
        (d / "m.safetensors").write_bytes(b"an older model")
        return {"protect": ["m.safetensors"], "names": ["m.safetensors"]}
    return setup, run


@case(2, r"other\.h5: already exists")
def denoise_over_another_file():
    def run(d, ctx):
        return cli("denoise", d / "in.tif", "-o", d / "other.h5", "--device", "cpu")
    return _existing("in.tif", "other.h5", names=["other.h5"]), run


@case(2, r"in_denoised\.tif: already exists")
def denoise_over_the_default_output():
    def run(d, ctx):
        return cli("denoise", d / "in.tif", "--device", "cpu")
    return _existing("in.tif", "in_denoised.tif", names=["in_denoised.tif"]), run


@case(2, r"existing\.h5: already exists")
def simulate_over_a_file():
    def run(d, ctx):
        return cli("simulate", d / "existing.h5", "--count", "1", "--shape", "2", "16", "16")
    return _existing("existing.h5"), run


@case(2, r"in\.tif: refusing to overwrite the input")
def denoise_over_its_input():
    def run(d, ctx):
        return cli("denoise", d / "in.tif", "-o", d / "in.tif", "--device", "cpu")
    return _existing("in.tif"), run


@case(2, r"link\.tif: refusing to overwrite the input")
def denoise_over_a_link_to_its_input():
    def setup(d):
        tif(d / "in.tif")
        os.symlink(d / "in.tif", d / "link.tif")
        return {"protect": ["in.tif"], "names": ["link.tif"]}

    def run(d, ctx):
        return cli("denoise", d / "in.tif", "-o", d / "link.tif", "--device", "cpu")
    return setup, run


@case(2, r"m\.safetensors: already exists")
def export_over_a_model():
    def run(d, ctx):
        return cli("export", d / "m.safetensors")
    return _existing("m.safetensors"), run


@case(2, r"out\.tif: already exists")
def write_tiff_over_a_file():
    def run(d, ctx):
        from napari_cnnt.io import tiff

        return call(tiff.write_tiff, d / "out.tif", stack())
    return _existing("out.tif"), run


@case(2, r"pairs\.h5: already exists")
def write_training_pairs_over_a_file():
    def run(d, ctx):
        from napari_cnnt.io import hdf5

        return call(hdf5.write_training_pairs, d / "pairs.h5", [(stack(), stack())])
    return _existing("pairs.h5"), run


@case(2, r"out\.tif: already exists")
def demo_over_a_file():
    def run(d, ctx):
        return cli("demo", "-o", d / "out.tif", "--device", "cpu")
    return _existing("out.tif"), run


@case(2, r"hard\.h5: refusing to overwrite the input")
def write_hdf5_over_a_hard_link_to_its_source():
    def setup(d):
        h5(d / "data.h5")
        os.link(d / "data.h5", d / "hard.h5")
        return {"protect": ["data.h5"], "names": ["hard.h5"]}

    def run(d, ctx):
        from napari_cnnt.io import hdf5

        source = hdf5.read_dataset(d / "data.h5", "x")
        kwargs = {"overwrite": True} if _accepts_overwrite() else {}
        try:
            return call(hdf5.write_hdf5, d / "hard.h5", "y", source.data, **kwargs)
        finally:
            source.data.file.close()
    return setup, run


# 3. Huge declared shapes -----------------------------------------------------------------
def _huge_h5(d: Path, compressed: bool = True, shape=(100000, 100000, 100000)) -> Path:
    import h5py

    p = d / "huge.h5"
    with h5py.File(p, "w") as f:
        if compressed:
            f.create_dataset("x", shape=shape, dtype="u2", chunks=(1, 256, 256), compression="gzip")
        else:
            f.create_dataset("x", shape=shape, dtype="u2")
    return p


def _huge_tiff(d: Path, compressed: bool = True) -> Path:
    """A tiny TIFF whose one page declares 2**20 x 2**20 pixels."""
    p = d / "huge.tif"
    n = 1 << 20
    tags = [(256, 4, 1, n), (257, 4, 1, n), (258, 3, 1, 8), (259, 3, 1, 8 if compressed else 1), (262, 3, 1, 1),
            (273, 4, 1, 200), (277, 3, 1, 1), (278, 4, 1, n), (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags) + struct.pack("<I", 0)
    body = b"II*\x00" + struct.pack("<I", 8) + ifd
    body += b"\0" * (200 - len(body)) + b"x\x9c" + b"\0" * 14
    p.write_bytes(body)
    return p


# A command run in a capped subprocess: its one-line error becomes the reported exception.
CLI_IN_SUBPROCESS = "import io, contextlib\nfrom napari_cnnt.cli import main\nerr = io.StringIO()\n"
CLI_ERROR = ("lines = [ln for ln in err.getvalue().splitlines() if 'error:' in ln]\n"
             "if rc: raise ValueError(lines[-1] if lines else err.getvalue())\n")


def _capped(code: str, expect_name: str):
    def run(d, ctx):
        return python(code, d)
    return run


@case(3, r"huge\.h5: dataset 'x' declares 100000 x 100000 x 100000")
def hdf5_huge_read():
    def setup(d):
        _huge_h5(d)
        return {"names": ["huge.h5"]}
    return setup, _capped("from napari_cnnt.io import hdf5\nims = hdf5.read_hdf5('huge.h5')\n"
                          "value = [float(im.data[0].max()) for im in ims]", "huge.h5")


@case(3, r"huge\.h5: dataset 'x' declares")
def hdf5_huge_napari_reader():
    def setup(d):
        _huge_h5(d)
        return {"names": ["huge.h5"]}
    return setup, _capped("from napari_cnnt.napari.reader import get_reader\nimport numpy as np\n"
                          "r = get_reader('huge.h5')\nlayers = r('huge.h5') if r else []\n"
                          "value = [float(np.asarray(l[0][0]).max()) for l in layers]", "huge.h5")


@case(3, r"huge\.h5: dataset 'x' declares")
def hdf5_huge_cli():
    def setup(d):
        _huge_h5(d)
        return {"names": ["huge.h5"], "allow": [".napari-cnnt"]}
    code = ("with contextlib.redirect_stderr(err):\n    rc = main(['denoise', 'huge.h5', '--device', 'cpu'])\n"
            + CLI_ERROR)
    return setup, _capped(CLI_IN_SUBPROCESS + code, "huge.h5")


@case(3, r"huge\.h5: dataset 'x' declares")
def hdf5_huge_contiguous():
    def setup(d):
        _huge_h5(d, compressed=False, shape=(50, 20000, 20000))
        return {"names": ["huge.h5"]}
    return setup, _capped("from napari_cnnt.io import hdf5\nims = hdf5.read_hdf5('huge.h5')\n"
                          "value = [float(im.data[0].max()) for im in ims]", "huge.h5")


@case(3, r"huge\.h5: dataset 'x' declares 4 x 60000 x 60000")
def hdf5_huge_frame():
    def setup(d):
        _huge_h5(d, shape=(4, 60000, 60000))
        return {"names": ["huge.h5"]}
    return setup, _capped("from napari_cnnt.io import hdf5\nims = hdf5.read_hdf5('huge.h5')\n"
                          "value = [float(im.data[0].max()) for im in ims]", "huge.h5")


@case(3, r"huge\.tif: the image declares 1048576 x 1048576")
def tiff_huge_compressed():
    def setup(d):
        _huge_tiff(d)
        return {"names": ["huge.tif"]}
    return setup, _capped("from napari_cnnt.io import tiff\nims = tiff.read_tiff('huge.tif')\n"
                          "value = [float(im.data[0].max()) for im in ims]", "huge.tif")


@case(3, r"huge\.tif: .*(truncated|declares)")
def tiff_huge_uncompressed():
    def setup(d):
        _huge_tiff(d, compressed=False)
        return {"names": ["huge.tif"]}
    return setup, _capped("from napari_cnnt.io import tiff\nims = tiff.read_tiff('huge.tif')\n"
                          "value = [float(im.data[0].max()) for im in ims]", "huge.tif")


@case(3, r"huge\.tif: the image declares")
def tiff_huge_napari_reader():
    def setup(d):
        _huge_tiff(d)
        return {"names": ["huge.tif"]}
    return setup, _capped("from napari_cnnt.napari.reader import get_reader\nimport numpy as np\n"
                          "r = get_reader('huge.tif')\nlayers = r('huge.tif') if r else []\n"
                          "value = [float(np.asarray(l[0][0]).max()) for l in layers]", "huge.tif")


@case(3, r"pairs\.h5: dataset 's0/noisy_im' declares")
def training_file_declaring_huge_samples():
    def setup(d):
        import h5py

        with h5py.File(d / "pairs.h5", "w") as f:
            g = f.create_group("s0")
            for k in ("noisy_im", "clean_im"):
                g.create_dataset(k, shape=(64, 20000, 20000), dtype="f4", chunks=(1, 256, 256), compression="gzip")
        return {"names": ["pairs.h5"]}
    return setup, _capped("from napari_cnnt.training.data import samples_from_h5\n"
                          "from napari_cnnt.normalization import Normalization\n"
                          "value = len(samples_from_h5('pairs.h5', Normalization()))", "pairs.h5")


# 4. Model files ---------------------------------------------------------------------------
def _load(name: str, config: Any = None) -> Callable:
    def run(d, ctx):
        from napari_cnnt.model.checkpoint import load_model

        return call(load_model, d / name, *(() if config is None else (config,)))
    return run


def _model_case(klass, name, expect, make, file="m.safetensors", capped=False, names=()):
    def setup(d):
        make(d / file)
        return {"names": list(names or [file]), "protect": [file]}
    if capped:
        run = _capped(f"from napari_cnnt.model.checkpoint import load_model\nm = load_model({file!r})\n"
                      "value = sum(p.numel() for p in m.parameters())", file)
    else:
        run = _load(file)

    def fn():
        return setup, run
    fn.__name__ = name
    case(klass, expect)(fn)


_model_case(4, "huge_channels", r"m\.safetensors: weights do not match",
            lambda p: with_config(p, blocks=[8192, 8192, 8192], n_head=8), capped=True)
_model_case(4, "huge_blocks_per_set", r"m\.safetensors: weights do not match",
            lambda p: with_config(p, blocks_per_set=10**7), capped=True)
_model_case(4, "huge_layer_norm_patch", r"m\.safetensors: weights do not match",
            lambda p: with_config(p, norm_mode="layer", height=65536, width=65536), capped=True)


def _entries(change: Callable[[dict], None]) -> Callable[[Path], Path]:
    def make(p):
        _, e, _ = bundled_parts()
        first = next(iter(e))
        change(e[first])
        return safetensors_file(p, entries=e)
    return make


_model_case(4, "tensor_without_data_offsets", r"m\.safetensors: corrupted model file",
            _entries(lambda t: t.pop("data_offsets")))
_model_case(4, "offsets_of_the_wrong_type", r"m\.safetensors: corrupted model file",
            _entries(lambda t: t.update(data_offsets=["0", "10"])))
_model_case(4, "unknown_dtype", r"m\.safetensors: corrupted model file", _entries(lambda t: t.update(dtype="Q99")))
_model_case(4, "shape_not_matching_bytes", r"m\.safetensors: corrupted model file",
            _entries(lambda t: t.update(shape=[10**6, 10**6])))
_model_case(4, "header_not_json", r"m\.safetensors: corrupted model file",
            lambda p: safetensors_file(p, raw_header=b"{not json" + b" " * 40))
_model_case(4, "config_not_an_object", r"m\.safetensors: damaged model header",
            lambda p: safetensors_file(p, meta={**bundled_parts()[0], "config": "[1, 2]"}))
_model_case(4, "metadata_not_text", r"m\.safetensors: corrupted model file",
            lambda p: safetensors_file(p, meta={**bundled_parts()[0], "format_version": 1}))
_model_case(4, "channel_count_as_text", r"m\.safetensors: damaged model header",
            lambda p: with_config(p, blocks="abc"))
_model_case(4, "fractional_blocks_per_set", r"m\.safetensors: damaged model header",
            lambda p: with_config(p, blocks_per_set=1.5))
_model_case(4, "two_byte_pt", r"m\.pt: not a CNNT model file", lambda p: p.write_bytes(b"\x80\x02"), file="m.pt")
def _random_pt(p: Path) -> None:
    p.write_bytes(b"\x80" + RNG.bytes(3000))
    p.with_suffix(".json").write_text(json.dumps({"blocks": [16, 24, 32]}))


_model_case(4, "random_pt", r"m\.pt: (truncated or corrupted|not a CNNT|holds Python objects)", _random_pt, file="m.pt")


def _nan_safetensors(p: Path) -> Path:
    m, e, d = bundled_parts()
    arr = np.frombuffer(d, dtype=np.uint8).copy()
    first = min(e.values(), key=lambda t: t["data_offsets"][0])
    a, b = first["data_offsets"]
    arr[a:b] = np.frombuffer(np.full((b - a) // 4, np.nan, np.float32).tobytes(), np.uint8)
    return safetensors_file(p, data=arr.tobytes())


_model_case(4, "nan_weights_safetensors", r"m\.safetensors: weight .* NaN", _nan_safetensors)
_model_case(4, "nan_weights_pt", r"m\.pt: weight .* NaN", lambda p: reference_pt(p, nan=True), file="m.pt")
_model_case(4, "with_mixer_false_as_text", r"m\.pt: weights do not match",
            lambda p: reference_pt(p, {"with_mixer": "false"}), file="m.pt")
_model_case(4, "with_mixer_not_a_flag", r"m\.pt: its configuration cannot describe",
            lambda p: reference_pt(p, {"with_mixer": "maybe"}), file="m.pt")
_model_case(4, "im_value_scale_as_text", r"m\.pt: its configuration cannot describe",
            lambda p: reference_pt(p, {"im_value_scale": "0 65536"}), file="m.pt")
_model_case(4, "reference_json_a_list", r"m\.json: expected a JSON object",
            lambda p: reference_pt(p) and p.with_suffix(".json").write_text("[1, 2, 3]"), file="m.pt",
            names=["m.json"])


def _pickle_with_code(p: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("code from the file ran",))
    p.write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    p.with_suffix(".json").write_text(json.dumps({"blocks": [16, 24, 32]}))


_model_case(9, "pickle_with_code_no_unsafe_advice", r"m\.pt: holds Python objects", _pickle_with_code, file="m.pt")


def _truncated_zip_pt(p: Path) -> None:
    reference_pt(p)
    p.write_bytes(p.read_bytes()[:5000])


_model_case(9, "truncated_pt_no_unsafe_advice", r"m\.pt: truncated or corrupted checkpoint", _truncated_zip_pt,
            file="m.pt")


# 5. Training settings ---------------------------------------------------------------------
def _train_case(name, expect, *flags, command="train", samples=(3, (8, 32, 32))):
    def setup(d):
        pairs(d / "pairs.h5", samples[0], samples[1])
        return {"protect": ["pairs.h5"], "allow": ["logs"], "names": [re.sub(r"\\", "", expect.split(":")[0])]
                if expect.startswith("-") else []}

    def run(d, ctx):
        extra = ["--preset", "small"] if command == "train" else []
        return cli(command, "--h5files", d / "pairs.h5", *extra, *_logs(d), *flags)

    def fn():
        return setup, run
    fn.__name__ = name
    case(5, expect)(fn)


_train_case("patch_larger_than_samples", r"--height/--width", "--height", "1000", "--width", "1000", "--device",
            "cpu", "--num_epochs", "1")
_train_case("patch_larger_than_samples_finetune", r"--height/--width", "--height", "1024", "--width", "1024",
            "--device", "cpu", "--num_epochs", "1", command="finetune")
_train_case("time_window_longer_than_stacks", r"--time", "--time", "500", "--device", "cpu", "--num_epochs", "1")
_train_case("zero_batch_size", r"batch_size", "--batch_size", "0", "--device", "cpu", "--num_epochs", "1")
_train_case("negative_learning_rate", r"lr", "--global_lr", "-1", "--device", "cpu", "--num_epochs", "1")
_train_case("channels_not_divisible_by_heads", r"n_head", "--blocks", "30", "50", "70", "--device", "cpu",
            "--num_epochs", "1")


# 6. Data outside the file ---------------------------------------------------------------
def _secret(d: Path) -> Path:
    p = d / "secret.bin"
    p.write_bytes(np.arange(4 * 32 * 32, dtype=np.uint16).tobytes())
    return p


def _external(d: Path) -> Path:
    import h5py

    _secret(d)
    with h5py.File(d / "ext.h5", "w") as f:
        f.create_dataset("x", shape=(4, 32, 32), dtype="<u2", external=[(str(d / "secret.bin"), 0, 4 * 32 * 32 * 2)])
    return d / "ext.h5"


def _virtual(d: Path) -> Path:
    import h5py

    h5(d / "other.h5", stack())
    layout = h5py.VirtualLayout(shape=(4, 32, 32), dtype="u2")
    layout[:] = h5py.VirtualSource(str(d / "other.h5"), "x", shape=(4, 32, 32))
    with h5py.File(d / "ext.h5", "w") as f:
        f.create_virtual_dataset("x", layout)
    return d / "ext.h5"


def _external_link(d: Path) -> Path:
    import h5py

    h5(d / "other.h5", stack())
    with h5py.File(d / "ext.h5", "w") as f:
        f["x"] = h5py.ExternalLink(str(d / "other.h5"), "x")
        f["y"] = np.zeros((2, 8, 8), np.uint8)
    return d / "ext.h5"


def _outside(name, make, how, expect):
    def setup(d):
        make(d)
        return {"names": ["ext.h5"]}

    def run(d, ctx):
        if how == "read":
            from napari_cnnt.io import hdf5

            r = call(hdf5.read_hdf5, d / "ext.h5")
            if r.error is None:
                r.value = [im.name for im in r.value]
            return r
        if how == "key":
            from napari_cnnt.io import hdf5

            return call(lambda: np.asarray(hdf5.read_dataset(d / "ext.h5", "x").data[()]).sum())
        if how == "napari":
            from napari_cnnt.napari.reader import get_reader

            reader = get_reader(str(d / "ext.h5"))
            return call(lambda: [m.get("name") for _, m, _ in (reader(str(d / "ext.h5")) if reader else [])])
        return cli("denoise", d / "ext.h5", "--dataset", "x", "-o", d / "out.tif", "--device", "cpu")

    def fn():
        return setup, run
    fn.__name__ = name
    # Reading only what the file holds: a refusal, or a result without the outside data, is right.
    good = (lambda value, ctx: value is not None and "x" not in value) if how in ("read", "napari") else None
    case(6, expect, good=good)(fn)


_outside("external_storage_read", _external, "read", r"ext\.h5: dataset 'x' keeps its data in other files")
_outside("external_storage_dataset", _external, "key", r"ext\.h5: dataset 'x' keeps its data in other files")
_outside("external_storage_napari", _external, "napari", r"ext\.h5: dataset 'x' keeps its data in other files")
_outside("external_storage_cli", _external, "cli", r"ext\.h5: dataset 'x' keeps its data in other files")
_outside("virtual_dataset_read", _virtual, "read", r"ext\.h5: dataset 'x' is a virtual dataset over other files")
_outside("virtual_dataset_cli", _virtual, "cli", r"ext\.h5: dataset 'x' is a virtual dataset")
_outside("external_link_dataset", _external_link, "key", r"ext\.h5: dataset 'x' is a link to another file")
_outside("external_link_read", _external_link, "read", r"")


# 7. SIGTERM -------------------------------------------------------------------------------
def _sigterm(command: list[str], wait_for: str):
    def setup(d):
        import tifffile

        tifffile.imwrite(d / "in.tif", stack((64, 64, 64)))
        return {"protect": ["in.tif"]}

    def run(d, ctx):
        code = ("import napari_cnnt.io as io\nio.LAZY_BYTES = 0\nimport sys\nfrom napari_cnnt.cli import main\n"
                f"sys.exit(main({command!r}))")
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith(wait_for) for p in d.iterdir()):
                break
            time.sleep(0.01)
        time.sleep(0.2)
        if proc.poll() is not None:
            return Result(crashed="finished before the signal (the case needs a longer run)")
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return Result(crashed="did not stop after SIGTERM")
        return Result(rc=proc.returncode if proc.returncode >= 0 else proc.returncode, stderr=err)
    return setup, run


@case(7, r"interrupted")
def sigterm_during_denoise():
    return _sigterm(["denoise", "in.tif", "-o", "out.tif", "--device", "cpu", "--tile", "8", "32", "32"],
                    ".napari-cnnt-")


@case(7, r"interrupted")
def sigterm_during_denoise_to_hdf5():
    return _sigterm(["denoise", "in.tif", "-o", "out.h5", "--device", "cpu", "--tile", "8", "32", "32"],
                    ".napari-cnnt-")


# 8. Silent garbage -----------------------------------------------------------------------
@case(8, good=lambda value, ctx: value[1] > 1500)
def percentile_limits_of_a_brightening_recording():
    def setup(d):
        return {}

    def run(d, ctx):
        from napari_cnnt.normalization import Normalization

        data = np.empty((3, 2048, 2048), np.uint16)
        data[0] = RNG.integers(0, 100, (2048, 2048))
        data[1:] = RNG.integers(1000, 2000, (2, 2048, 2048))
        return call(Normalization("percentile", 1.5, 99.5).limits, data)
    return setup, run


def _denoise(data_fn: Callable[[], np.ndarray], **kwargs):
    def setup(d):
        return {}

    def run(d, ctx):
        from napari_cnnt.inference import denoise

        return call(denoise, data_fn(), None, device="cpu", **kwargs)
    return setup, run


def _finite(value, ctx):
    return value is not None and bool(np.isfinite(value).all())


for _name, _fn, _kw, _expect in (
        ("constant_float32_max", lambda: np.full((4, 32, 32), np.finfo(np.float32).max, np.float32), {},
         r"too large for the network|not finite"),
        ("float64_times_1e300", lambda: stack().astype(np.float64) * 1e300, {}, r"too large|not finite"),
        ("nan_input", lambda: np.where(RNG.random((4, 32, 32)) < 0.01, np.nan, 1.0).astype(np.float32), {},
         r"NaN or infinite"),
        ("fractional_tile", lambda: stack().astype(np.float32), {"tile": (2.5, 32, 32)}, r"tile must be"),
        ("fractional_batch_size", lambda: stack().astype(np.float32), {"batch_size": 1.5}, r"batch_size must be"),
        ("fractional_time_axis", lambda: stack((2, 4, 32, 32)).astype(np.float32), {"time_axis": 1.5},
         r"time_axis must be")):
    def _make(fn=_fn, kw=_kw):
        return _denoise(fn, **kw)
    _make.__name__ = _name
    case(8, _expect, good=_finite if not _kw else (lambda value, ctx: False))(_make)


# 9. Clear messages ------------------------------------------------------------------------
def _reader_case(name, make, expect):
    def setup(d):
        make(d)
        return {"names": [f for f in ("noise.h5", "empty.tif", "tables.h5", "noise.tif") if (d / f).exists()]}

    def run(d, ctx):
        from napari_cnnt.napari.reader import get_reader

        target = str(d / ctx["names"][0])
        reader = get_reader(target)
        if reader is None:
            return Result(error=type("ReaderRefused", (ValueError,), {})(
                f"Reader 'napari-cnnt' was selected to open {Path(target).name!r}, but refused the file."))
        return call(reader, target)

    def fn():
        return setup, run
    fn.__name__ = name
    case(9, expect)(fn)


def _tables(d):
    import h5py

    with h5py.File(d / "tables.h5", "w") as f:
        f["trace"] = np.arange(50.0)


_reader_case("napari_random_bytes_h5", lambda d: (d / "noise.h5").write_bytes(RNG.bytes(3000)),
             r"noise\.h5: not an HDF5 file")
_reader_case("napari_random_bytes_tif", lambda d: (d / "noise.tif").write_bytes(RNG.bytes(3000)),
             r"noise\.tif: not a TIFF file")
_reader_case("napari_empty_tif", lambda d: (d / "empty.tif").write_bytes(b""), r"empty\.tif: the file is empty")
_reader_case("napari_no_image_datasets", _tables, r"tables\.h5: holds no image datasets")


def _cli_input(name, make, expect, *flags):
    def setup(d):
        target = make(d)
        return {"names": [target], "protect": [target] if (d / target).is_file() else []}

    def run(d, ctx):
        return cli("denoise", d / ctx["names"][0], "-o", d / "out.tif", "--device", "cpu", *flags)

    def fn():
        return setup, run
    fn.__name__ = name
    case(9, expect)(fn)


def _nan_tif(d):
    data = stack().astype(np.float32)
    data[2, 5, 5] = np.nan
    tif(d / "nan.tif", data)
    return "nan.tif"


def _corrupt_chunks(d):
    import h5py

    with h5py.File(d / "bad.h5", "w") as f:
        f.create_dataset("x", data=stack((4, 64, 64)), chunks=(1, 64, 64), compression="gzip")
        offset = f["x"].id.get_chunk_info(2).byte_offset
    raw = bytearray((d / "bad.h5").read_bytes())
    raw[offset:offset + 200] = RNG.bytes(200)
    (d / "bad.h5").write_bytes(bytes(raw))
    return "bad.h5"


def _empty(d):
    (d / "empty.tif").write_bytes(b"")
    return "empty.tif"


def _folder(d):
    (d / "stack.tif").mkdir()
    return "stack.tif"


def _bad_model(d):
    tif(d / "in.tif")
    (d / "m.pt").write_bytes(RNG.bytes(100))
    return "in.tif"


_cli_input("cli_nan_input", _nan_tif, r"nan\.tif: .*NaN or infinite")
_cli_input("cli_corrupt_hdf5_chunk", _corrupt_chunks, r"bad\.h5: .*cannot be read")
_cli_input("cli_empty_input", _empty, r"empty\.tif")
_cli_input("cli_folder_as_input", _folder, r"stack\.tif: no such file")


@case(9, r"m\.pt: not a CNNT model file")
def cli_random_model_file():
    def setup(d):
        tif(d / "in.tif")
        (d / "m.pt").write_bytes(RNG.bytes(100))
        return {"names": ["m.pt"], "protect": ["in.tif", "m.pt"]}

    def run(d, ctx):
        return cli("denoise", d / "in.tif", "--model", d / "m.pt", "-o", d / "out.tif", "--device", "cpu")
    return setup, run


@case(9, r"out\.tif: could not be written: the disk is full", needs_mount=True)
def tiff_full_disk_message_is_plain():
    def setup(d):
        return {"names": ["out.tif"], "allow": ["full"]}

    def run(d, ctx):
        from napari_cnnt.io import tiff

        with tmpfs(d, "256k") as full:
            r = call(tiff.write_tiff, full / "out.tif", RNG.random((8, 128, 128), dtype=np.float32))
            if r.error is None or listing(full):
                return Result(value=sorted(listing(full)))
            return r
    return setup, run


@case(9, r"missing\.h5: no such file")
def training_with_a_missing_file():
    def setup(d):
        return {"names": ["missing.h5"], "allow": ["logs"]}

    def run(d, ctx):
        return cli("finetune", "--h5files", d / "missing.h5", *_logs(d), "--device", "cpu")
    return setup, run


def by_class() -> dict[int, list[Case]]:
    out: dict[int, list[Case]] = {}
    for c in CASES:
        out.setdefault(c.klass, []).append(c)
    return out
