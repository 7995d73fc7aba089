import pytest
import torch

from napari_cnnt import runtime
from napari_cnnt.losses import psnr
from napari_cnnt.model import PRESETS, CNNTDenoiser
from napari_cnnt.model import fused as fused_module
from napari_cnnt.model.fused import FusedMixer
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
    """The prepared model gives the model's numbers bit for bit; the unfused inference copy
    (fused q/k/v weights) to float32 rounding."""
    model = CNNTDenoiser(tiny_config).eval()
    x = torch.rand(2, 4, 1, 16, 16)
    rt = Runtime.create("cpu", fast=False)
    with torch.no_grad():
        expected = model(x)
    net = rt.prepare(model) if prepare == "prepare" else rt.inference_copy(model, fused_float32=False)
    torch.testing.assert_close(rt.predict(net, x), expected, rtol=0, atol=atol)


def test_fused_float32_copy_agrees_with_plain_float32(tiny_config):
    """Channels-last with oneDNN's conv+GELU and frames in chunks: float32 rounding only."""
    model = CNNTDenoiser(tiny_config.replace(blocks=(16, 16, 32), height=32, width=32)).eval()
    x = torch.rand(2, 6, 1, 32, 48)
    rt = Runtime.create("cpu", fast=False)
    plain = rt.predict(rt.inference_copy(model, fused_float32=False), x)
    net = rt.inference_copy(model, fused_float32=True)
    assert any(isinstance(m, FusedMixer) for m in net.modules())
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert net.pre_cnnt[1].conv2d.weight.is_contiguous(memory_format=torch.channels_last)
    fused = rt.predict(net, x)
    assert (fused - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert not torch.equal(fused, plain)  # a different computation, not the plain one again


def test_fused_float32_chosen_only_for_narrow_models_without_bf16(monkeypatch, tiny_config):
    """With bf16 switched off, the default float32 copy is fused for narrow models (faster
    there) and left plain for wide ones and where oneDNN's float32 conv+GELU cannot run."""
    monkeypatch.setenv(runtime.DISABLE_BF16, "1")
    monkeypatch.setattr(runtime, "cpu_runs_bf16", runtime.cpu_runs_bf16.__wrapped__)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", runtime.cpu_has_native_bf16.__wrapped__)
    rt = Runtime.create("cpu")
    assert rt.fast is False
    assert runtime.float32_fusion_pays(PRESETS["small"]) and not runtime.float32_fusion_pays(PRESETS["reference"])

    def fused(config) -> bool:
        return any(isinstance(m, FusedMixer) for m in rt.inference_copy(CNNTDenoiser(config)).modules())

    assert fused(tiny_config)
    assert not fused(tiny_config.replace(blocks=(8, runtime.FUSED_FLOAT32_MAX_CHANNELS + 8)))
    monkeypatch.setattr(fused_module, "_float32_conv_gelu_runs", lambda: False)
    assert not runtime.float32_fusion_pays(PRESETS["small"]) and not fused(tiny_config)


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
