"""Each loss against an independent float64 computation with numpy/scipy/scikit-image."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_cnnt import losses

B, T, H, W = 2, 3, 24, 20


@pytest.fixture
def pair():
    rng = np.random.default_rng(3)
    t = rng.random((B, T, 1, H, W))
    o = np.clip(t + 0.1 * rng.standard_normal(t.shape), 0, 1)
    return o, t


def _torch(*arrays):
    return [torch.from_numpy(a.astype(np.float32)) for a in arrays]


def _s():
    return H * W / 4096


def test_mse(pair):
    o, t = pair
    expected = np.sqrt(((o - t) ** 2).sum()) / (B * T) / _s()
    assert losses.mse_loss(*_torch(o, t)).item() == pytest.approx(expected, rel=1e-5)


def test_l1(pair):
    o, t = pair
    expected = np.abs(o - t).sum() / (B * T) / _s()
    assert losses.l1_loss(*_torch(o, t)).item() == pytest.approx(expected, rel=1e-5)


def _gaussian_window_2d():
    x = np.arange(7) - 3
    g = np.exp(-(x**2) / (2 * 1.5**2))
    g /= g.sum()
    return np.outer(g, g), g


def _ssim_map_np(x, y, blur):
    C1, C2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return ((2 * mx * my + C1) * (2 * sxy + C2)) / ((mx**2 + my**2 + C1) * (sxx + syy + C2))


def test_sobel_against_scipy(pair):
    o, t = pair

    def magnitude(img):  # the reference's kernels are -2x scipy's Sobel
        return 2 * np.hypot(ndimage.sobel(img, axis=-1, mode="constant"), ndimage.sobel(img, axis=-2, mode="constant"))

    total = sum(((magnitude(o[b, f, 0]) - magnitude(t[b, f, 0])) ** 2).sum() for b in range(B) for f in range(T))
    expected = np.sqrt(total) / (B * T) / _s()
    assert losses.sobel_loss(*_torch(o, t)).item() == pytest.approx(expected, rel=1e-4)


def test_ssim_against_scipy_convolution(pair):
    o, t = pair
    window, _ = _gaussian_window_2d()

    def blur(z):
        return ndimage.correlate(z, window, mode="constant", cval=0.0)

    per_frame = np.array([[_ssim_map_np(o[b, f, 0], t[b, f, 0], blur).mean() for f in range(T)] for b in range(B)])
    got = losses.ssim_per_frame(*_torch(o, t)).numpy()
    np.testing.assert_allclose(got, per_frame, atol=1e-5)
    assert losses.ssim_loss(*_torch(o, t)).item() == pytest.approx(1 - per_frame.mean(), abs=1e-5)


def test_ssim_interior_matches_scikit_image(pair):
    """Away from the zero-padded border, the per-pixel SSIM is scikit-image's with the same window."""
    from skimage.metrics import structural_similarity

    o, t = pair
    x, y = o[0, 0, 0], t[0, 0, 0]
    window, _ = _gaussian_window_2d()
    # scikit-image builds its Gaussian window from sigma and a 3.5-sigma truncation, so
    # sigma=0.8 gives a 7x7 window; our blur uses the same sigma for this comparison.
    _, sk_map = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=0.8,
                                      use_sample_covariance=False, full=True)
    r = int(3.5 * 0.8 + 0.5)
    assert 2 * r + 1 == 7
    xx = np.arange(7) - 3
    g = np.exp(-(xx**2) / (2 * 0.8**2))
    g /= g.sum()
    ours = _ssim_map_np(x, y, lambda z: ndimage.correlate(z, np.outer(g, g), mode="constant"))
    np.testing.assert_allclose(ours[3:-3, 3:-3], sk_map[3:-3, 3:-3], atol=1e-6)
    # and the torch implementation agrees with the numpy one everywhere (sigma 1.5)
    win15, _ = _gaussian_window_2d()
    ours15 = _ssim_map_np(x, y, lambda z: ndimage.correlate(z, win15, mode="constant"))
    got = losses.ssim_per_frame(*_torch(o[:1, :1], t[:1, :1])).item()
    assert got == pytest.approx(ours15.mean(), abs=1e-5)


def test_ssim3d_against_scipy(pair):
    o, t = pair
    _, g = _gaussian_window_2d()
    window = g[:, None, None] * g[None, :, None] * g[None, None, :]

    def blur(z):
        return ndimage.correlate(z, window, mode="constant", cval=0.0)

    per_sample = np.array([_ssim_map_np(o[b, :, 0], t[b, :, 0], blur).mean() for b in range(B)])
    np.testing.assert_allclose(losses.ssim3d_per_sample(*_torch(o, t)).numpy(), per_sample, atol=1e-5)
    assert losses.ssim3d_loss(*_torch(o, t)).item() == pytest.approx(1 - per_sample.mean(), abs=1e-5)


def test_weighted_forms(pair):
    o, t = pair
    to, tt = _torch(o, t)
    w_sample = torch.tensor([1.0, 3.0])
    w_frame = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 1.0]])
    d2 = ((o - t) ** 2).reshape(B, T, -1).sum(-1)
    expected = np.sqrt((w_sample.numpy()[:, None] * d2).sum() / w_sample.numpy().sum()) / (B * T) / _s()
    assert losses.mse_loss(to, tt, w_sample).item() == pytest.approx(expected, rel=1e-5)
    expected = np.sqrt((w_frame.numpy() * d2).sum() / w_frame.numpy().sum()) / (B * T) / _s()
    assert losses.mse_loss(to, tt, w_frame).item() == pytest.approx(expected, rel=1e-5)
    s = losses.ssim_per_frame(to, tt).numpy()
    assert losses.ssim_loss(to, tt, w_frame).item() == pytest.approx(
        1 - (w_frame.numpy() * s).sum() / w_frame.numpy().sum(), abs=1e-6)
    # SSIM losses are weighted means, so equal weights change nothing
    for fn in (losses.ssim_loss, losses.ssim3d_loss):
        assert fn(to, tt, torch.full((B,), 2.0)).item() == pytest.approx(fn(to, tt).item(), rel=1e-5)
    # the reference divides the weighted sum of squares by the sum of the weights
    d2_sobel = (losses.sobel_magnitude(to.reshape(-1, 1, H, W)) - losses.sobel_magnitude(tt.reshape(-1, 1, H, W))) ** 2
    per_frame = d2_sobel.reshape(B, T, -1).sum(-1).numpy()
    expected = np.sqrt((w_frame.numpy() * per_frame).sum() / w_frame.numpy().sum()) / (B * T) / _s()
    assert losses.sobel_loss(to, tt, w_frame).item() == pytest.approx(expected, rel=1e-5)


def test_combined_loss(pair):
    to, tt = _torch(*pair)
    combo = losses.CombinedLoss(["ssim", "mse"], [1.0, 0.1])
    expected = losses.ssim_loss(to, tt) + 0.1 * losses.mse_loss(to, tt)
    assert combo(to, tt).item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses.CombinedLoss("SSIM3d").names == ["ssim3D"]
    with pytest.raises(ValueError, match="unknown loss 'perceptual'"):
        losses.CombinedLoss(["perceptual"])
    with pytest.raises(ValueError, match="one weight per loss"):
        losses.CombinedLoss(["ssim", "mse"], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        losses.CombinedLoss(["ssim"], [float("nan")])


def test_gradients_are_finite_at_perfect_prediction():
    t = torch.rand(1, 2, 1, 16, 16)
    o = t.clone().requires_grad_(True)
    flat = torch.zeros(1, 2, 1, 16, 16, requires_grad=True)
    for fn in losses.LOSSES.values():
        for x, y in ((o, t), (flat, torch.zeros_like(t))):
            fn(x, y).backward()
            assert torch.isfinite(x.grad).all()
            x.grad = None


def test_metrics(pair):
    o, t = pair
    to, tt = _torch(o, t)
    expected = -10 * np.log10(((o.astype(np.float32) - t.astype(np.float32)) ** 2).mean())
    assert losses.psnr(to, tt).item() == pytest.approx(expected, abs=1e-3)
    assert losses.ssim(tt, tt).item() == pytest.approx(1.0, abs=1e-6)
    assert losses.ssim(to, tt).item() < 0.99


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="equal shape"):
        losses.mse_loss(torch.rand(1, 2, 1, 8, 8), torch.rand(1, 2, 1, 8, 9))
