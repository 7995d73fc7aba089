"""Where and how the network runs: device choice and the fast path.

The fast path is bfloat16 with channels-last weights: autocast in training,
a bf16 inference copy in inference. Without it, float32 inference on a CPU
still runs channels-last with fused mixers for narrow models, where that is
faster (``float32_fusion_pays``). On CPUs with native bf16 instructions
oneDNN runs the convolutions 2-2.3x faster than float32 with AVX512-BF16
(measured), and on the AMX matrix units where present; on CUDA it uses the
tensor cores. On other hardware bf16 would be emulated and slower, so it
stays off unless forced.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple's MPS, then the CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} was asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was asked for, but MPS is not available")
    return dev


DISABLE_BF16 = "NAPARI_CNNT_DISABLE_BF16"
"""Set to 1 to treat the CPU as one without bfloat16: what an AVX2-only machine does."""


class FastPathUnavailable(ValueError):
    """The bfloat16 fast path was asked for on hardware that cannot run it."""


@functools.cache
def cpu_runs_bf16() -> bool:
    """Whether oneDNN can execute bfloat16 convolutions on this CPU, found by running one.

    PyTorch refuses oneDNN's bf16 convolutions unless the CPU has AVX512 (BW,
    VL, DQ) or AVX-NE-CONVERT, and ``ONEDNN_MAX_CPU_ISA`` can lower what
    oneDNN may use; a flag in /proc/cpuinfo says neither, so the operator the
    fast path depends on (a convolution with a fused GELU, in bf16) is run once
    on a tiny input and compared with float32.
    """
    if os.environ.get(DISABLE_BF16, "").strip().lower() not in ("", "0", "false", "no"):
        return False
    op = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(1, 8, 6, 6, generator=gen).to(memory_format=torch.channels_last)
        w = torch.rand(8, 8, 3, 3, generator=gen).to(memory_format=torch.channels_last) / 8
        with torch.inference_mode():
            got = op(x.bfloat16(), w.bfloat16(), None, [1, 1], [1, 1], [1, 1], 1, "gelu", [], "none")
            want = torch.nn.functional.gelu(torch.nn.functional.conv2d(x, w, padding=1))
        return bool(torch.allclose(got.float(), want, rtol=0.05, atol=0.05))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16) and
    oneDNN runs it; elsewhere bf16 would be emulated and slower than float32."""
    if not cpu_runs_bf16():
        return False
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        return bool({"avx512_bf16", "amx_bf16"} & flags)
        except OSError:
            return False
    return False


def fast_path_supported(device: torch.device) -> bool:
    """Whether the fast path pays off on ``device`` (the default for ``fast=None``)."""
    if device.type == "cpu":
        return cpu_has_native_bf16()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def fast_path_unavailable(device: torch.device) -> str | None:
    """Why the fast path cannot run on ``device``, or ``None`` if it can."""
    if device.type == "cpu" and not cpu_runs_bf16():
        if os.environ.get(DISABLE_BF16):
            return f"the bfloat16 fast path is switched off on this computer ({DISABLE_BF16} is set)"
        return ("this CPU cannot run the bfloat16 fast path (it needs AVX512-BF16 or AMX, "
                "as on Intel Xeon since Cooper Lake or AMD Zen 4); use float32 instead")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU cannot run the bfloat16 fast path; use float32 instead"
    return None


# Widest block set up to which the float32 inference copy runs channels-last with
# fused mixers on a CPU (see ``float32_fusion_pays``).
FUSED_FLOAT32_MAX_CHANNELS = 64


def float32_fusion_pays(config) -> bool:
    """Whether float32 inference on the CPU runs faster channels-last with fused mixers.

    Measured on the development CPU (2 cores, AVX-512) on the batches ``denoise``
    runs for the bundled model (``small``, 3 tiles of 18 x 64 x 64): 1.96x the
    plain float32 copy natively and 1.37x in AVX2 mode. The ``reference``
    preset's wide convolutions, already near the machine's peak, gain
    nothing reliable (0.93x natively, 1.05x in AVX2 mode on one 16 x 128 x
    128 tile, within run-to-run noise) and round a little more (2.4e-5 of
    the output's range). So it is used for models whose widest block set has
    at most ``FUSED_FLOAT32_MAX_CHANNELS`` channels, where oneDNN's float32
    convolution with a fused GELU runs.
    """
    from .model.fused import _onednn_conv_gelu_available

    return max(config.blocks) <= FUSED_FLOAT32_MAX_CHANNELS and _onednn_conv_gelu_available(torch.float32)


@dataclass(frozen=True)
class Runtime:
    """A device and whether the bf16 fast path is used on it.

    ``fast=None`` enables the fast path where the hardware supports it.
    """

    device: torch.device
    fast: bool

    @classmethod
    def create(cls, device: str | torch.device | None = "auto", fast: bool | None = None) -> Runtime:
        """``fast=True`` where the hardware cannot run bf16 raises :class:`FastPathUnavailable`."""
        dev = resolve_device(device)
        if fast is None:
            return cls(dev, fast_path_supported(dev))
        if fast:
            reason = fast_path_unavailable(dev)
            if reason is not None:
                raise FastPathUnavailable(reason)
        return cls(dev, bool(fast))

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` (in place) to the device, channels-last where it pays off."""
        model = model.to(self.device)
        if self.fast or self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    @contextlib.contextmanager
    def precision(self) -> Iterator[None]:
        """TF32 matrix products and convolutions on CUDA, for the calls inside the block only.

        PyTorch's TF32 switches are process-wide; they are set on entry and put back on exit,
        so code outside napari-cnnt's own calls keeps whatever the user chose.
        """
        if self.device.type != "cuda":
            yield
            return
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The block's arithmetic: bfloat16 autocast on the fast path, TF32 on CUDA (:meth:`precision`)."""
        with self.precision():
            if not self.fast:
                yield
                return
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield

    def inference_copy(self, model: nn.Module, fused_float32: bool | None = None) -> nn.Module:
        """A frozen copy of ``model`` for :meth:`predict`; ``model`` itself is untouched.

        The attention projections are fused once and, on the fast path, every
        weight is stored in bf16, so no call concatenates or casts weights and
        no normalisation bounces through float32 as it does under autocast;
        the mixers also become :class:`~napari_cnnt.model.fused.FusedMixer`.
        Without the fast path, on a CPU, the copy stays float32 and becomes
        channels-last with fused mixers where :func:`float32_fusion_pays`
        (``fused_float32`` overrides that), which agrees with the model to
        float32 rounding; otherwise its arithmetic is exactly the model's.
        """
        from .model.fused import fuse_mixers

        net = copy.deepcopy(model).eval().requires_grad_(False)
        for module in net.modules():
            fuse = getattr(module, "fuse_projections", None)
            if callable(fuse):
                fuse()
        net = self.prepare(net)
        if self.fast:
            return fuse_mixers(net.to(torch.bfloat16))
        if self.device.type == "cpu":
            if fused_float32 is None:
                fused_float32 = float32_fusion_pays(model.config)
            if fused_float32:
                net = fuse_mixers(net.to(memory_format=torch.channels_last))
        return net

    def predict(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Run ``model`` on a ``[B, T, 1, H, W]`` batch; float32 result on the model's device.

        ``model`` is an :meth:`inference_copy` (bf16 weights run as they are) or
        a float32 model (run under autocast on the fast path).
        """
        dtype = next(model.parameters()).dtype
        context = self.autocast() if dtype == torch.float32 else self.precision()
        with torch.inference_mode(), context:
            y = model(batch.to(self.device, dtype, non_blocking=True))
        return y.float()
