import pytest
import torch

from napari_cnnt import runtime
from napari_cnnt.losses import psnr
from napari_cnnt.model import CNNTDenoiser
from napari_cnnt.runtime import Runtime, resolve_device


def test_auto_device_is_cpu_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_bad_devices_are_explained():
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda:1")


def test_fast_path_follows_hardware(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_runs_bf16", lambda: True)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)  # bf16 runs, but emulated
    assert Runtime.create("cpu").fast is False
    assert Runtime.create("cpu", fast=True).fast is True  # asked for: allowed, since it runs
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert Runtime.create("cpu").fast is True
    assert Runtime.create("cpu", fast=False).fast is False  # can always be switched off


def test_fast_path_refused_where_bf16_cannot_run(no_bf16):
    assert Runtime.create("cpu").fast is False
    with pytest.raises(runtime.FastPathUnavailable, match="cannot run the bfloat16 fast path"):
        Runtime.create("cpu", fast=True)
    assert isinstance(runtime.FastPathUnavailable("x"), ValueError)  # what the CLI and widgets report


def test_bf16_probe_runs_the_operator_and_can_be_switched_off(monkeypatch):
    """The probe runs oneDNN's bf16 convolution; the environment switch makes any CPU look AVX2-only."""
    probe = runtime.cpu_runs_bf16.__wrapped__
    monkeypatch.setenv(runtime.DISABLE_BF16, "1")
    assert probe() is False
    monkeypatch.setattr(runtime, "cpu_runs_bf16", probe)  # uncached, reads the environment
    assert "NAPARI_CNNT_DISABLE_BF16" in runtime.fast_path_unavailable(torch.device("cpu"))
    monkeypatch.setenv(runtime.DISABLE_BF16, "0")
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise",
                        lambda *a: calls.append(a) or (_ for _ in ()).throw(RuntimeError("bf16 path needs avx512bw")))
    assert probe() is False and calls and calls[0][0].dtype == torch.bfloat16


@pytest.mark.parametrize("prepare,atol", [("prepare", 0.0), ("inference_copy", 1e-6)])
def test_float32_path_is_exact(tiny_config, prepare, atol):
    """The prepared model gives the model's numbers bit for bit; the inference copy
    (fused q/k/v weights) to float32 rounding."""
    model = CNNTDenoiser(tiny_config).eval()
    x = torch.rand(2, 4, 1, 16, 16)
    rt = Runtime.create("cpu", fast=False)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(rt.predict(getattr(rt, prepare)(model), x), expected, rtol=0, atol=atol)


def test_inference_copy_leaves_the_model_alone(tiny_config):
    model = CNNTDenoiser(tiny_config).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fast in (False, True):
        net = Runtime(torch.device("cpu"), fast).inference_copy(model)  # builds the copy; nothing runs
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        assert {p.dtype for p in net.parameters()} == {torch.bfloat16 if fast else torch.float32}
        assert set(net.state_dict()) == set(before)  # fused weights are not saved with the model
    assert model.training and all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.bf16
@pytest.mark.parametrize("prepare", ["prepare", "inference_copy"])
def test_fast_path_close_to_float32(tiny_config, prepare):
    """bf16 (autocast on a prepared model, or the bf16 inference copy) stays within 45 dB of
    float32 on random weights (the bundled model: test_bundled_model.py)."""
    model = CNNTDenoiser(tiny_config.replace(blocks=(16, 16, 32), height=32, width=32)).eval()
    x = torch.rand(2, 4, 1, 32, 32)
    exact = Runtime.create("cpu", fast=False).predict(model, x)
    fast_rt = Runtime.create("cpu", fast=True)
    fast = fast_rt.predict(getattr(fast_rt, prepare)(model), x)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    span = exact.max() - exact.min()
    assert psnr(fast / span, exact / span).item() > 45.0


def test_tf32_is_switched_on_for_our_own_cuda_calls_only():
    """TF32 is process-wide in PyTorch: a CUDA runtime turns it on inside its blocks and puts it back."""
    cuda = Runtime(torch.device("cuda"), False)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with cuda.precision():
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with Runtime(torch.device("cpu"), False).autocast():
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.bf16
def test_the_fast_path_leaves_no_autocast_behind(tiny_config):
    """Autocast is thread-local state: after a fast prediction the caller's arithmetic is float32 again."""
    rt = Runtime.create("cpu", fast=True)
    model = rt.prepare(CNNTDenoiser(tiny_config).eval())
    assert rt.predict(model, torch.rand(1, 4, 1, 16, 16)).dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")
    with rt.autocast():
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
