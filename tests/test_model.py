import dataclasses
import itertools
import json

import numpy as np
import pytest
import reference_fixtures
import torch
import torch.nn.functional as F

from napari_cnnt import load_model
from napari_cnnt.model import CNNTConfig, CNNTDenoiser, ConfigError, preset
from napari_cnnt.model.layers import BlockSet, CNNTAttention


def _reproduces(model, io_file):
    assert not model.training
    io = np.load(io_file)
    with torch.inference_mode():
        y = model(torch.from_numpy(io["x"])).numpy()
    assert y.shape == io["y"].shape
    assert np.abs(y - io["y"]).max() < 1e-5


@pytest.mark.parametrize("name", reference_fixtures.NAMES)
def test_reference_fixture_reproduced(name):
    """Each reference model, loaded from its .pt and JSON, gives the reference's output to 1e-5."""
    folder = reference_fixtures.FOLDER
    _reproduces(load_model(folder / f"{name}.pt"), folder / f"{name}_io.npz")


def test_small_preset_has_a_reference_fixture():
    assert load_model(reference_fixtures.FOLDER / "small.pt").config == preset("small"), (
        "the small preset no longer matches its reference fixture; make the fixtures again "
        "(tests/fixtures/README.md)"
    )


def test_reference_fixtures_cover_every_option():
    configs = [load_model(reference_fixtures.FOLDER / f"{n}.pt").config for n in reference_fixtures.NAMES]
    assert {c.levels for c in configs} == {2, 3, 4}
    assert {c.norm_mode for c in configs} == {"layer", "batch", "instance", "mixed"}
    for option in ("with_mixer", "no_residual", "is_causal"):
        assert {getattr(c, option) for c in configs} == {False, True}, option
    assert {c.kernel_size for c in configs} >= {3, 5}
    assert {c.blocks_per_set for c in configs} >= {1, 2, 4}
    assert {c.n_head for c in configs} >= {1, 8}
    assert {c.pre_channels for c in configs} == {(16, 32), preset("small").pre_channels}


def test_full_size_fixture_reproduced(fixtures_dir):
    _reproduces(load_model(fixtures_dir / "seedfmt_default.pt"), fixtures_dir / "seedfmt_default_io.npz")


def _reference_attention(attn: CNNTAttention, x: torch.Tensor) -> torch.Tensor:
    """The section-1 recipe written out step by step with three separate convolutions."""
    B, T, C, H, W = x.shape
    frames = x.reshape(B * T, C, H, W)
    q, k, v = (m.conv2d(frames).reshape(B, T, -1, H, W) for m in (attn.query, attn.key, attn.value))
    Co = q.shape[2]
    nh, hc = attn.n_head, Co // attn.n_head
    q, k, v = (z.view(B, T, nh, hc, H, W).transpose(1, 2).reshape(B, nh, T, hc * H * W) for z in (q, k, v))
    a = q @ k.transpose(-2, -1) / np.sqrt(hc * H * W)
    if attn.is_causal:
        a = a.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))
    y = a.softmax(-1) @ v
    y = y.view(B, nh, T, hc, H, W).transpose(1, 2).reshape(B * T, Co, H, W)
    return attn.output_proj.conv2d(y).reshape(B, T, Co, H, W)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_recipe(causal):
    attn = CNNTAttention(6, 8, n_head=4, is_causal=causal, dropout_p=0.0).eval()
    x = torch.randn(2, 5, 6, 8, 12)
    with torch.no_grad():
        assert torch.allclose(attn(x), _reference_attention(attn, x), atol=1e-5)


def test_attention_is_layout_independent_with_gradients():
    """Channels-last tensors take a different (copy-saving) feature order in the attention."""
    attn = CNNTAttention(6, 8, n_head=4, dropout_p=0.0)
    x = torch.randn(2, 5, 6, 8, 12)
    upstream = torch.randn(2, 5, 8, 8, 12)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        attn.zero_grad()
        attn.to(memory_format=layout)
        xi = x.flatten(0, 1).contiguous(memory_format=layout).unflatten(0, (2, 5)).requires_grad_()
        y = attn(xi)
        y.backward(upstream)
        results.append((y.detach(), xi.grad, attn.query.conv2d.weight.grad.clone()))
    with torch.no_grad():
        expected = _reference_attention(attn, x)
    for y, _, _ in results:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-5, atol=1e-5)
    assert results[1][0].flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


def test_causal_attention_ignores_the_future():
    attn = CNNTAttention(4, 4, n_head=2, is_causal=True, dropout_p=0.0).eval()
    x = torch.randn(1, 6, 4, 8, 8)
    x2 = x.clone()
    x2[:, 4:] += 1.0  # change only the last two time points
    with torch.no_grad():
        y, y2 = attn(x), attn(x2)
    assert torch.allclose(y[:, :4], y2[:, :4], atol=1e-6)
    assert not torch.allclose(y[:, 4:], y2[:, 4:])


def test_resampling_matches_reference_trilinear():
    cfg = CNNTConfig(blocks=(4, 4), blocks_per_set=1, n_head=2, height=8, width=8)
    x = torch.randn(2, 3, 4, 8, 8)
    for mode, scale in (("down", 0.5), ("up", 2.0)):
        bs = BlockSet(4, 4, mode, "instance", 8, 8, cfg).eval()
        with torch.no_grad():
            out, resampled = bs(x)
            expected = F.interpolate(out, scale_factor=(1.0, scale, scale), mode="trilinear", align_corners=False)
        assert torch.allclose(resampled, expected, atol=1e-6)


OPTION_GRID = list(itertools.product(
    [(8, 16), (8, 16, 8), (8, 8, 16, 16)],
    ["layer", "batch", "instance", "mixed"],
))


@pytest.mark.parametrize("blocks,norm", OPTION_GRID)
def test_every_architecture_runs(blocks, norm):
    cfg = CNNTConfig(blocks=blocks, blocks_per_set=1, n_head=2, pre_channels=(4, 8), height=16, width=16)
    model = CNNTDenoiser(cfg).eval()
    x = torch.rand(2, 3, 1, 16, 16)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if norm != "layer":  # other sizes work too; T=1 works
        with torch.no_grad():
            assert model(torch.rand(1, 1, 1, 32, 24)).shape == (1, 1, 1, 32, 24)


@pytest.mark.parametrize("changes", [
    dict(with_mixer=False), dict(no_residual=True), dict(is_causal=True),
    dict(kernel_size=5, padding=2), dict(n_head=1),
])
def test_options_change_the_network(tiny_config, changes):
    base = CNNTDenoiser(tiny_config).eval()
    other = CNNTDenoiser(tiny_config.replace(**changes)).eval()
    x = torch.rand(1, 4, 1, 16, 16)
    shared = {k: v for k, v in base.state_dict().items() if k in other.state_dict()
              and other.state_dict()[k].shape == v.shape}
    other.load_state_dict(shared, strict=False)
    with torch.no_grad():
        assert other(x).shape == x.shape
        assert not torch.allclose(base(x), other(x))


def test_dropout_only_in_training(tiny_config):
    model = CNNTDenoiser(tiny_config.replace(dropout_p=0.3))
    x = torch.rand(1, 4, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(model.train()(x), model(x))
        assert torch.equal(model.eval()(x), model(x))


def test_mixed_norm_uses_instance_at_both_ends():
    cfg = CNNTConfig(blocks=(8, 8, 8), blocks_per_set=1, n_head=2, norm_mode="mixed", pre_channels=(4, 8))
    assert cfg.norm_modes() == ["instance", "batch", "batch", "batch", "instance"]
    keys = CNNTDenoiser(cfg).state_dict().keys()
    assert any(k.startswith("cnnt.down2.blocks.0.bn1.") for k in keys)
    assert not any(k.startswith("cnnt.down1.blocks.0.bn1.") for k in keys)


def test_rejects_bad_input(tiny_config):
    model = CNNTDenoiser(tiny_config).eval()
    with pytest.raises(ValueError, match=r"\[B, T, 1, H, W\]"):
        model(torch.rand(4, 1, 16, 16))
    with pytest.raises(ValueError, match="not a multiple of 2"):
        model(torch.rand(1, 2, 1, 15, 16))


def _all_option_configs():
    yield CNNTConfig()
    yield from (preset(n) for n in ("small", "reference"))
    yield CNNTConfig(blocks=(8, 16, 24, 32), blocks_per_set=2, n_head=4, kernel_size=5, padding=2,
                     dropout_p=0.25, norm_mode="layer", with_mixer=False, is_causal=True,
                     no_residual=True, pre_channels=(4, 12), time=7, height=40, width=56)
    yield CNNTConfig(blocks=(16, 16), norm_mode="mixed", height=34, width=18)


@pytest.mark.parametrize("cfg", list(_all_option_configs()))
def test_config_json_round_trip(cfg):
    text = cfg.to_json()
    back = CNNTConfig.from_json(text)
    assert back == cfg
    assert json.loads(back.to_json()) == json.loads(text)
    assert CNNTConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


@pytest.mark.parametrize("bad,match", [
    (dict(blocks=(8,)), "2 to 4"),
    (dict(blocks=(8, 8, 8, 8, 8)), "2 to 4"),
    (dict(blocks=(8, 12), n_head=8), "divisible by n_head"),
    (dict(norm_mode="group"), "norm_mode"),
    (dict(stride=2), "image size"),
    (dict(kernel_size=4), "odd"),
    (dict(height=30), "multiple of 4"),
    (dict(dropout_p=1.5), "dropout_p"),
])
def test_config_rejects_impossible_networks(bad, match):
    with pytest.raises(ConfigError, match=match):
        CNNTConfig(**bad)


def test_config_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="colour"):
        CNNTConfig.from_dict({"blocks": [8, 8], "colour": "red"})


def test_presets_compute_ratio():
    from torch.utils.flop_counter import FlopCounterMode

    def flops(cfg):
        m = CNNTDenoiser(cfg).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(torch.rand(1, 4, 1, 64, 64))
        return fc.get_total_flops()

    ref, small = flops(preset("reference")), flops(preset("small"))
    assert ref / (4 * 64 * 64) > 7e6  # about 8 TFLOP per megapixel-frame
    assert ref / small >= 20
    assert sum(p.numel() for p in CNNTDenoiser(preset("reference")).parameters()) == 12_279_905


def test_training_reduces_loss(tiny_config):
    from napari_cnnt.losses import CombinedLoss

    model = CNNTDenoiser(tiny_config).train()
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(2, 4, 1, 16, 16, generator=g)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
    loss_fn = CombinedLoss(["ssim", "mse"], [1.0, 0.1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = loss_fn(model(noisy), clean).item()
    for _ in range(25):
        opt.zero_grad()
        loss = loss_fn(model(noisy), clean)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    with torch.no_grad():
        after = loss_fn(model(noisy), clean).item()
    assert after < 0.7 * before


def test_instance_norm_is_layout_independent_with_gradients():
    from napari_cnnt.model.layers import InstanceNorm

    x = torch.randn(3, 5, 9, 7, dtype=torch.float64)
    upstream = torch.randn_like(x)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xi = x.clone().to(memory_format=layout).requires_grad_()
        y = InstanceNorm()(xi)
        assert y.is_contiguous(memory_format=layout)  # the next convolution sees the layout it expects
        y.backward(upstream)
        results.append((y.detach(), xi.grad))
    expected = F.instance_norm(x, eps=1e-5)
    for y, _ in results:
        torch.testing.assert_close(y, expected)
    torch.testing.assert_close(results[0][1], results[1][1])


def test_fused_attention_projections_match_the_separate_ones():
    attn = CNNTAttention(8, 8, n_head=2).eval()
    x = torch.randn(2, 3, 8, 6, 6)
    with torch.no_grad():
        expected = attn(x)
        attn.fuse_projections()
        assert attn.qkv_weight is not None and "qkv_weight" not in attn.state_dict()
        torch.testing.assert_close(attn(x), expected, rtol=0, atol=0)
