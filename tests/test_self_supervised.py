"""Self-supervised objectives: what the network learns from is truly hidden from it, and noisy stacks
alone train, validate, resume and run data-parallel."""

import math

import numpy as np
import pytest
import torch

import napari_cnnt
from napari_cnnt.model import CNNTDenoiser
from napari_cnnt.normalization import Normalization
from napari_cnnt.synthetic import simulate
from napari_cnnt.training import interlace
from napari_cnnt.training.blindspot import CENTRE, VISIBLE, draw_mask, grid_for, hide, masked_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(patch_sizes=(16,), time=4, batch_size=2, fast=False)
NORM = Normalization("fixed", 100, 180)


def stack(seed, structure="membranes", shape=(6, 32, 32)):
    return simulate(shape, (structure,), seed=seed)


def test_mask_hides_the_fraction_asked_spread_evenly():
    rng = np.random.default_rng(0)
    picks = draw_mask((3, 4, 1, 64, 64), 0.02, rng)
    g = grid_for(0.02)
    assert g == 7
    assert picks.shape == (3, 4, 1, 64, 64)
    mask = picks >= 0
    assert set(np.unique(picks[mask])) == set(range(25)) - {CENTRE}  # any neighbour, never the pixel itself
    assert (picks[~mask] == VISIBLE).all()
    # One pixel per whole g x g box of every frame, boxes cut by the edge hiding at most one.
    full = (64 // g) ** 2
    per_frame = mask.reshape(12, 64, 64).sum((1, 2))
    assert (per_frame >= full).all() and (per_frame <= (-(-64 // g)) ** 2).all()
    boxes = mask.reshape(12, 64, 64)[:, : 9 * g, : 9 * g].reshape(12, 9, g, 9, g).sum((2, 4))
    assert (boxes == 1).all()
    # Frames are masked independently: the positions differ between frames.
    assert not np.array_equal(mask[0, 0], mask[0, 1])


def test_hidden_pixels_take_the_value_of_the_neighbour_named_never_a_hidden_one():
    x = torch.arange(100.0).reshape(1, 1, 1, 10, 10)
    mask = torch.full_like(x, VISIBLE, dtype=torch.int8)
    mask[..., 5, 5] = 13  # its right-hand neighbour (5, 6), which is hidden too: the next one, (5, 7)
    mask[..., 5, 6] = 0  # its top-left neighbour (3, 4)
    mask[..., 0, 0] = 0  # at the edge: mirrored, (2, 2)
    out = hide(x, mask)
    assert out[0, 0, 0, 5, 5] == x[0, 0, 0, 5, 7]
    assert out[0, 0, 0, 5, 6] == x[0, 0, 0, 3, 4]
    assert out[0, 0, 0, 0, 0] == x[0, 0, 0, 2, 2]
    untouched = mask < 0
    assert torch.equal(out[untouched], x[untouched])


def test_the_blind_spot_is_blind(tiny_config):
    """The loss has exactly zero gradient with respect to every hidden pixel's input value, in every
    frame, through the whole network (instance norm and attention across time included), while the
    visible pixels, the same positions in the other frames among them, do receive gradient."""
    torch.manual_seed(1)
    net = CNNTDenoiser(tiny_config.replace(height=32, width=32)).train()
    noisy = torch.rand(2, 4, 1, 32, 32, requires_grad=True)
    picks = torch.from_numpy(draw_mask(tuple(noisy.shape), 0.02, np.random.default_rng(3)))
    out = net(hide(noisy, picks))
    loss = masked_loss(out, noisy.detach(), picks)
    loss.backward()
    grad = noisy.grad
    mask = picks >= 0
    assert mask.sum() > 50
    assert torch.count_nonzero(grad[mask]) == 0
    assert torch.count_nonzero(grad[~mask]) > 0.5 * (~mask).sum()
    # The same pixels in the other frames are legitimate evidence, and the network uses it.
    other = torch.roll(mask, 1, dims=1) & ~mask
    assert torch.count_nonzero(grad[other]) > 0.5 * other.sum()


def test_without_hiding_the_gradient_test_would_fail(tiny_config):
    """The check above can fail: fed the unhidden input, the hidden positions get gradient."""
    net = CNNTDenoiser(tiny_config.replace(height=32, width=32)).train()
    noisy = torch.rand(1, 4, 1, 32, 32, requires_grad=True)
    picks = torch.from_numpy(draw_mask(tuple(noisy.shape), 0.02, np.random.default_rng(3)))
    masked_loss(net(noisy), noisy.detach(), picks).backward()
    mask = picks >= 0
    assert torch.count_nonzero(noisy.grad[mask]) > 0.9 * mask.sum()


def test_interlaced_input_is_every_other_frame_and_the_target_made_of_its_neighbours():
    assert interlace.input_frames(5, 0).tolist() == [0, 2, 4]
    assert interlace.input_frames(5, 1).tolist() == [1, 3]
    before, after = interlace.neighbours(5)
    assert before.tolist() == [1, 0, 1, 2, 3] and after.tolist() == [1, 2, 3, 4, 3]  # one neighbour at the ends
    assert interlace.frames_seen(16) == 8 and interlace.frames_seen(5) == 3
    noisy = np.arange(5.0)[:, None, None] * np.ones((1, 2, 2))
    np.testing.assert_allclose(interlace.between_frames(noisy, noisy, "none")[:, 0, 0], [1, 1, 2, 3, 3])
    with pytest.raises(ValueError, match="motion must be one of"):
        interlace.between_frames(noisy, noisy, "blend")
    with pytest.raises(ValueError, match="at least 2 frames"):
        interlace.input_frames(1, 0)


def test_the_aligned_target_follows_what_moves():
    """Two blobs jittering independently by up to 2 px a frame: the neighbours moved along the
    starting model's optical flow stand for the frame between them far better than their plain
    mean, a blurred frame; the flow is the motion, and warping is exact for whole pixels."""
    yy, xx = np.mgrid[:96, :96].astype(np.float32)
    dx, dy = [0, 1.2, -0.3, 0.9, 2.0, 0.5, 1.5], [0, -0.8, 0.4, -1.0, 0.2, -0.6, 0.7]

    def scene(t):
        left = np.exp(-((yy - 28) ** 2 + (xx - 24 - dx[t]) ** 2) / 8)
        right = np.exp(-((yy - 68 - dy[t]) ** 2 + (xx - 70) ** 2) / 6)
        return (left + right).astype(np.float32)

    clean = np.stack([scene(t) for t in range(7)])
    inner = (slice(1, 6), slice(8, 88), slice(8, 88))
    aligned = interlace.between_frames(clean, clean, "flow")
    plain = interlace.between_frames(clean, clean, "none")
    assert np.abs(aligned - clean)[inner].max() < 0.1 * np.abs(plain - clean)[inner].max()
    flow = interlace.flow(clean[3], clean[4])  # clean[4] sampled along it looks like clean[3]
    assert abs(float(np.median(flow[1][22:35, 20:32])) - (dx[4] - dx[3])) < 0.15
    assert abs(float(np.median(flow[0][62:75, 64:77])) - (dy[4] - dy[3])) < 0.15
    shifted = np.roll(clean[0], 2, axis=1)
    np.testing.assert_allclose(interlace.warp(shifted, np.stack([np.zeros((96, 96)), np.full((96, 96), 2.0)]))[:, :90],
                               clean[0][:, :90], atol=1e-5)


@pytest.mark.parametrize("motion", ["flow", "none"])
@pytest.mark.parametrize("parity", [0, 1])
def test_the_interlaced_target_is_hidden_from_the_network(tiny_config, parity, motion):
    """Every frame reaches the loss one way only: the frames the network sees through the network
    (attention across time included), the others through the target, so no noisy value is both
    input and target."""
    torch.manual_seed(1)
    net = CNNTDenoiser(tiny_config.replace(height=32, width=32)).train()
    noisy = torch.rand(7, 32, 32, requires_grad=True)
    yy, xx = np.mgrid[:32, :32]
    start = np.stack([np.sin((xx + t) / 4.0) * np.cos(yy / 5.0) for t in range(7)]).astype(np.float32)
    seen = torch.from_numpy(interlace.input_frames(7, parity))
    target = interlace.between_frames(noisy, start, motion)[seen]
    out = net(noisy[seen][None, :, None])[0, :, 0]
    through_input, = torch.autograd.grad((out - target.detach()).square().mean(), noisy)
    through_target, = torch.autograd.grad((out.detach() - target).square().mean(), noisy)
    others = [t for t in range(7) if t % 2 != parity]
    assert torch.count_nonzero(through_input[others]) == 0
    assert torch.count_nonzero(through_input[seen]) > 0.5 * through_input[seen].numel()
    assert torch.count_nonzero(through_target[seen]) == 0
    # Warping may leave a neighbour's pixel out; without it every one counts.
    reached = 0.9 if motion == "flow" else 1.0
    assert torch.count_nonzero(through_target[others]) >= reached * through_target[others].numel()


def test_without_interlacing_the_gradient_test_would_fail(tiny_config):
    """The check above can fail: a target made of the frames the network sees gets their gradient."""
    net = CNNTDenoiser(tiny_config.replace(height=32, width=32)).train()
    noisy = torch.rand(6, 32, 32, requires_grad=True)
    seen = torch.from_numpy(interlace.input_frames(6, 0))
    out = net(noisy[seen][None, :, None])[0, :, 0]
    through_target, = torch.autograd.grad((out.detach() - noisy[seen]).square().mean(), noisy)
    assert torch.count_nonzero(through_target[seen]) == through_target[seen].numel()


def test_the_interlaced_loss_ranks_denoisers_as_the_truth_does():
    """Without truth, validation must still tell a better denoiser from a worse one: on a drifting,
    bleaching scene with independent noise in every frame and an imperfect starting model, the
    loss against the interlaced targets ranks the truth first, then a blurred truth, then the noisy
    frames themselves."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    clean = np.stack([(0.5 + 0.3 * np.sin((xx + 0.7 * t) / 3.0) * np.cos(yy / 4.0)) * np.exp(-0.02 * t)
                      for t in range(8)]).astype(np.float32)
    noisy = clean + rng.normal(0, 0.2, clean.shape).astype(np.float32)
    start = 0.9 * clean + 0.05  # the starting model's output, biased
    target = interlace.between_frames(noisy, start)

    def loss(output):
        seen = interlace.input_frames(8, 0)
        return float(np.mean((output[seen] - target[seen]) ** 2))

    blurred = torch.nn.functional.avg_pool2d(torch.from_numpy(clean), 5, 1, 2, count_include_pad=False).numpy()
    assert loss(clean) < loss(blurred) < loss(noisy) and loss(clean) < loss(start)


def test_noisy_stacks_get_interlaced_targets_and_pairs_keep_their_truth(model):
    """Through the trainer's samples: a noisy stack's target is made of its neighbours and the
    starting model's output, a pair's stays its clean image."""
    from napari_cnnt.training.data import make_samples
    from napari_cnnt.training.settings import TrainSettings
    from napari_cnnt.training.trainer import Trainer

    noisy, clean = stack(1)
    samples = make_samples("pair", noisy, clean, NORM) + make_samples("alone", stack(2)[0], None, NORM)
    trainer = Trainer(model, samples, [], TrainSettings(patch_sizes=(16,), time=4, batch_size=2), fast=False)
    pair, alone = trainer.train_samples
    assert pair.target is pair.clean and pair.between is None
    start = napari_cnnt.denoise(alone.noisy, model, normalization="none", device=trainer.runtime)
    motion = trainer.settings.motion
    np.testing.assert_allclose(alone.target, interlace.between_frames(alone.noisy, start, motion), atol=1e-6)


def test_the_interlaced_objective_does_not_pad_noisy_stacks_in_time(model):
    """A repeated frame would be input and target at once: a time window longer than the shortest
    noisy stack is refused, naming the setting."""
    from napari_cnnt.training.plan import SettingError

    with pytest.raises(SettingError, match="cannot pad") as e:
        napari_cnnt.finetune(model, [stack(1)[0], stack(2, shape=(4, 32, 32))[0]], epochs=1, steps_per_epoch=1,
                             patch_sizes=(16,), time=6, batch_size=2, fast=False)
    assert e.value.setting == "time"


@pytest.fixture
def model(tiny_config):
    m = CNNTDenoiser(tiny_config)
    m.normalization = NORM
    return m


@pytest.mark.parametrize("objective, key, name", [("interlaced", "val_interlaced_loss", "in-between-frame loss"),
                                                   ("blind-spot", "val_masked_loss", "masked-pixel loss")])
def test_noisy_stacks_alone_train_and_validate_without_truth(model, objective, key, name):
    data = [stack(1)[0], (stack(2)[0], None)]
    kw = {} if objective == "interlaced" else {"objective": objective}  # the recipe's default, or chosen
    trained, history = napari_cnnt.finetune(model, data, epochs=3, steps_per_epoch=3, lr=1e-3, **TINY, **kw)
    assert trained.metadata["training"]["recipe"] == "self-supervised"
    assert trained.metadata["training"]["objective"] == objective
    assert history.metric == key
    assert len(history) == 3
    assert all(math.isfinite(v) for v in history[key])
    assert all(math.isnan(v) for v in history["val_psnr"])  # no truth, no PSNR
    other = next(k for k in ("val_interlaced_loss", "val_masked_loss") if k != key)
    assert all(math.isnan(v) for v in history[other])  # only the objective's own score is measured
    assert math.isfinite(history.initial[key])
    best = min([history.initial[key], *history[key]])
    assert history.best_score == best
    assert name in history.summary()
    assert key in history.to_csv().splitlines()[0]


@pytest.mark.parametrize("objective", ["interlaced", "blind-spot"])
def test_validation_is_fixed_so_the_starting_score_repeats(model, objective):
    data = [stack(1)[0], stack(2)[0]]
    kw = dict(epochs=1, steps_per_epoch=1, lr=1e-9, objective=objective, **TINY)
    _, a = napari_cnnt.finetune(model, data, **kw)
    _, b = napari_cnnt.finetune(model, data, **kw)
    assert a.initial[a.metric] == b.initial[b.metric] and math.isfinite(a.initial[a.metric])


def test_the_masked_loss_ranks_denoisers_as_the_truth_does():
    """Without truth, validation must still tell a better denoiser from a worse one: on a smooth
    image with independent noise the masked-pixel loss of the truth beats that of a blurred copy."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    clean = (0.5 + 0.3 * np.sin(xx / 3.0) * np.cos(yy / 4.0))[None, None, None].astype(np.float32)
    noisy = torch.from_numpy(clean + rng.normal(0, 0.2, clean.shape).astype(np.float32))
    mask = torch.from_numpy(draw_mask(noisy.shape, 0.02, rng))
    good = masked_loss(torch.from_numpy(clean), noisy, mask)
    blurred = torch.nn.functional.avg_pool2d(torch.from_numpy(clean[0, 0]), 5, 1, 2, count_include_pad=False)
    bad = masked_loss(blurred[None, None], noisy, mask)
    assert good < bad


def test_single_frames_hide_pixels(model):
    """A frame has no neighbours in time: single-frame stacks learn by the blind spot, and say so."""
    data = [stack(1, shape=(1, 32, 32))[0][0], stack(2, shape=(1, 32, 32))[0][0]]
    trained, history = napari_cnnt.finetune(model, data, epochs=1, steps_per_epoch=2, patch_sizes=(16,),
                                            batch_size=2, fast=False)
    assert trained.metadata["training"]["objective"] == "blind-spot"
    assert history.metric == "val_masked_loss" and math.isfinite(history["val_masked_loss"][0])
    assert any("single frames" in note for note in history.notes)


def test_pairs_and_noisy_stacks_mix(model):
    noisy, clean = stack(1, "filaments")
    data = [(noisy, clean), stack(2)[0], stack(3)[0]]
    trained, history = napari_cnnt.finetune(model, data, epochs=2, steps_per_epoch=3, **TINY)
    assert history.metric == "val_interlaced_loss"
    assert len(history) == 2 and math.isfinite(history["train_loss"][-1])
    # A validation sample with truth also reports PSNR.
    assert all(math.isfinite(v) for v in history["val_psnr"])


def test_selecting_by_psnr_without_truth_is_refused(model):
    with pytest.raises(ValueError, match="val_interlaced_loss"):
        napari_cnnt.finetune(model, [stack(1)[0], stack(2)[0]], recipe="few-sample", epochs=1, **TINY)


def test_self_supervised_run_resumes_like_an_uninterrupted_one(model, tmp_path):
    data = [stack(1)[0], stack(2)[0]]
    kw = dict(epochs=4, steps_per_epoch=2, lr=1e-3, patience=0, scheduler="ReduceLROnPlateau", **TINY)
    _, whole = napari_cnnt.finetune(model, data, **kw)
    ckpt = tmp_path / "run.ckpt"
    napari_cnnt.finetune(model, data, checkpoint=ckpt, **{**kw, "epochs": 2})
    _, resumed = napari_cnnt.finetune(model, data, checkpoint=ckpt, **kw)
    assert resumed["val_interlaced_loss"] == pytest.approx(whole["val_interlaced_loss"], rel=1e-5)


def test_command_line_finetunes_on_noisy_files_alone(tiny_config, tmp_path, monkeypatch):
    """``napari-cnnt finetune --noisy`` reads TIFF and HDF5 stacks without truth, trains
    self-supervised, logs its validation loss and writes a model that says how it was trained."""
    import csv

    import h5py
    import tifffile

    from napari_cnnt import load_model
    from napari_cnnt.cli import main
    from napari_cnnt.model.checkpoint import save_model

    monkeypatch.chdir(tmp_path)
    tifffile.imwrite("a.tif", stack(1)[0])
    with h5py.File("b.h5", "w") as f:
        f["recording"] = stack(2)[0]
    base = CNNTDenoiser(tiny_config)
    base.normalization = NORM
    save_model(base, "base.safetensors")
    rc = main(["finetune", "--noisy", "a.tif", "b.h5:recording", "--load_path", "base.safetensors",
               "--num_epochs", "2", "--steps_per_epoch", "2", "--batch_size", "2", "--time", "4", "--height", "16",
               "--width", "16", "--no-fast", "--run_name", "ss", "--objective", "blind-spot", "--blind_spot", "0.03"])
    assert rc == 0
    model = load_model("logs/model/ss.safetensors")
    training = model.metadata["training"]
    assert training["recipe"] == "self-supervised" and training["blind_spot"] == 0.03
    assert training["objective"] == "blind-spot" and training["select"] == "val_masked_loss"
    assert len(model.metadata["training_data"]["train"]) == 2
    with open("logs/results/ss_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(math.isfinite(float(r["val_masked_loss"])) for r in rows)
    assert "masked-pixel loss" in open("logs/logs/ss.log").read()


def test_command_line_chooses_how_interlaced_targets_follow_motion(tiny_config, tmp_path, monkeypatch):
    """``--motion`` reaches the training settings, the default is the optical flow, and an unknown
    choice is refused by the parser."""
    import tifffile

    from napari_cnnt import load_model
    from napari_cnnt.cli import main
    from napari_cnnt.model.checkpoint import save_model

    monkeypatch.chdir(tmp_path)
    tifffile.imwrite("a.tif", stack(1)[0])
    base = CNNTDenoiser(tiny_config)
    base.normalization = NORM
    save_model(base, "base.safetensors")
    common = ["finetune", "--noisy", "a.tif", "--load_path", "base.safetensors", "--num_epochs", "1",
              "--steps_per_epoch", "1", "--batch_size", "1", "--time", "4", "--height", "16", "--width", "16",
              "--no-fast"]
    assert main([*common, "--run_name", "plain", "--motion", "none"]) == 0
    assert main([*common, "--run_name", "flow"]) == 0
    assert load_model("logs/model/plain.safetensors").metadata["training"]["motion"] == "none"
    assert load_model("logs/model/flow.safetensors").metadata["training"]["motion"] == "flow"
    with pytest.raises(SystemExit):
        main([*common, "--motion", "blend"])


def test_two_process_torchrun_matches_one_process_without_truth(tiny_config, tmp_path, monkeypatch):
    import csv
    import os
    import shutil
    import subprocess
    from pathlib import Path

    import tifffile

    from napari_cnnt.cli import main
    from napari_cnnt.model.checkpoint import save_model

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    monkeypatch.chdir(tmp_path)
    for k in range(2):
        tifffile.imwrite(f"s{k}.tif", stack(k)[0])
    base = CNNTDenoiser(tiny_config)
    base.normalization = NORM
    save_model(base, "base.safetensors")
    common = ["finetune", "--noisy", "s0.tif", "s1.tif", "--load_path", "base.safetensors", "--num_epochs", "3",
              "--steps_per_epoch", "3", "--batch_size", "4", "--time", "4", "--height", "16", "--width", "16",
              "--global_lr", "0.001", "--device", "cpu", "--no-fast"]
    assert main([*common, "--run_name", "single"]) == 0
    src = Path(napari_cnnt.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "napari_cnnt.cli", *common,
                             "--run_name", "ddp"], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    def rows(name):
        with open(f"logs/results/{name}_metrics.csv") as f:
            return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]

    single, ddp = rows("single"), rows("ddp")
    assert len(single) == len(ddp) == 3
    for a, b in zip(single, ddp):
        for key in ("train_loss", "val_interlaced_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), key
    assert single[0]["train_loss"] != single[-1]["train_loss"]


@pytest.mark.bf16
def test_fast_path_trains_without_truth_like_float32(model):
    data = [stack(1)[0], stack(2)[0]]
    kw = dict(epochs=3, steps_per_epoch=3, lr=1e-3, patch_sizes=(16,), time=4, batch_size=2)
    _, h32 = napari_cnnt.finetune(model, data, fast=False, **kw)
    _, h16 = napari_cnnt.finetune(model, data, fast=True, **kw)
    assert h16["val_interlaced_loss"][-1] == pytest.approx(h32["val_interlaced_loss"][-1], rel=0.05)
