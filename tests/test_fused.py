import pytest
import torch

from napari_cnnt.model import CNNTDenoiser, fused
from napari_cnnt.model.fused import FusedMixer, fuse_mixers
from napari_cnnt.model.layers import CNNTBlock
from napari_cnnt.runtime import Runtime


def _frames_last(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, x.shape[:2])


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("cache_bytes", [FusedMixer.cache_bytes, 1, 3 * 32 * 12 * 12 * 4])
def test_fused_mixer_computes_the_mixer(monkeypatch, onednn, cache_bytes):
    """Same numbers as conv -> GELU -> conv, whole or a few frames at a time, with or without oneDNN."""
    if onednn and not fused._onednn_conv_gelu_available(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN convolution with GELU")
    monkeypatch.setattr(fused, "_onednn_conv_gelu_available", lambda dtype: onednn)
    block = CNNTBlock(8, "instance", 12, 12, n_head=2, dropout_p=0.0).eval()
    block.to(memory_format=torch.channels_last)
    mixer = FusedMixer(block.mlp)
    mixer.cache_bytes = cache_bytes  # 1: one frame at a time; the last: 3 frames, then a remainder of 2
    x = _frames_last(torch.randn(1, 5, 8, 12, 12))
    with torch.no_grad():
        expected = block.mlp(x)
        got = mixer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


def _bf16_mixer_case():
    block = CNNTBlock(8, "instance", 12, 12, n_head=2, dropout_p=0.0).eval()
    block.to(torch.bfloat16, memory_format=torch.channels_last)
    x = _frames_last(torch.randn(1, 5, 8, 12, 12)).bfloat16()
    with torch.no_grad():
        expected = block.mlp(x)
    return block, x, expected


@pytest.mark.bf16
def test_fused_mixer_in_bf16_uses_onednn_where_it_runs():
    """bf16 is what the fast path feeds the mixer: oneDNN's fused GELU runs and agrees."""
    assert fused._onednn_conv_gelu_available(torch.bfloat16)
    block, x, expected = _bf16_mixer_case()
    with torch.no_grad():
        got = FusedMixer(block.mlp)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.02, atol=0.02)


def test_fused_mixer_in_bf16_falls_back_where_onednn_cannot(no_bf16, monkeypatch):
    """Without bf16 support the private operator is never called (it would raise)."""
    assert not fused._onednn_conv_gelu_available(torch.bfloat16)
    assert fused._onednn_conv_gelu_available(torch.float64) is False

    def refuse(*args):
        raise AssertionError("oneDNN's bf16 convolution was called on a CPU that cannot run it")

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", refuse)
    block, x, expected = _bf16_mixer_case()
    with torch.no_grad():
        got = FusedMixer(block.mlp)(x)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0)


def test_fused_mixer_chunks_frames_only_on_the_cpu():
    mixer = FusedMixer(CNNTBlock(16, "instance", 128, 128, n_head=2).mlp)  # 64-channel intermediate
    per_frame = 64 * 128 * 128 * 2  # bf16 bytes
    cpu = torch.empty(40, 16, 128, 128, dtype=torch.bfloat16)
    assert mixer.frames_per_chunk(cpu) == FusedMixer.cache_bytes // per_frame < 40
    assert mixer.frames_per_chunk(torch.empty(40, 16, 128, 128, dtype=torch.bfloat16, device="meta")) == 40


def test_fused_mixer_takes_only_a_mixer():
    with pytest.raises(TypeError, match="mixer"):
        FusedMixer(torch.nn.Sequential(torch.nn.Identity(), torch.nn.ReLU(), torch.nn.Identity()))


def test_only_fast_or_chosen_inference_copies_fuse_mixers(tiny_config):
    model = CNNTDenoiser(tiny_config)
    fast = Runtime(torch.device("cpu"), True).inference_copy(model)  # builds the copy; nothing runs
    exact = Runtime.create("cpu", fast=False).inference_copy(model, fused_float32=False)
    blocks = [m for m in fast.modules() if isinstance(m, CNNTBlock)]
    assert blocks and all(isinstance(b.mlp, FusedMixer) for b in blocks)
    assert not any(isinstance(m, FusedMixer) for m in exact.modules())  # float32 stays the model's arithmetic
    assert not any(isinstance(m, FusedMixer) for m in model.modules())
    assert fuse_mixers(fast) is fast and all(isinstance(b.mlp, FusedMixer) for b in blocks)  # idempotent
