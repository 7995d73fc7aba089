import threading

import numpy as np
import pytest
import torch

import napari_cnnt
from napari_cnnt.model import CNNTDenoiser
from napari_cnnt.normalization import Normalization
from napari_cnnt.synthetic import simulate
from napari_cnnt.training import CheckpointMismatch, TrainSettings, load_checkpoint_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(patch_sizes=(16,), time=4, batch_size=2, fast=False)
# The simulator's camera: offset 100 ADU, brightest pixels near 170 ADU.
NORM = Normalization("fixed", 100, 180)


def pair(structure, seed, shape=(6, 32, 32), **camera):
    """A (noisy, clean) time-lapse of one structure type."""
    return simulate(shape, (structure,), seed=seed, **camera)


@pytest.fixture
def model(tiny_config):
    m = CNNTDenoiser(tiny_config)
    m.normalization = NORM
    return m


@pytest.fixture(scope="module")
def filaments_model(one_torch_thread):
    """A tiny model trained from scratch on filaments only."""
    from napari_cnnt.model import CNNTConfig

    cfg = CNNTConfig(blocks=(8, 16), blocks_per_set=1, n_head=2, pre_channels=(4, 8), dropout_p=0.0)
    return napari_cnnt.train(
        [pair("filaments", s) for s in range(4)], val_data=[pair("filaments", 10)], config=cfg,
        normalization=NORM, epochs=20, lr=2e-3, loss=("ssim", "mse"), loss_weights=(1, 0.1),
        patches_per_sample=4, **{**TINY, "batch_size": 4},
    )


def _same_weights(a, b):
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_tiny_model_overfits_two_pairs(tiny_config):
    pairs = [pair("filaments", 1, peak_photons=400), pair("puncta", 2, peak_photons=400)]
    model, history = napari_cnnt.train(
        pairs, val_data=pairs, config=tiny_config, normalization=NORM, epochs=40, lr=2e-3,
        loss="mse", patches_per_sample=2, **TINY,
    )
    losses = history["train_loss"]
    assert len(losses) == 40
    assert losses[-1] <= 0.2 * losses[0]
    assert history.best_epoch > 30
    assert history.best["val_loss"] == min(history["val_loss"])


def test_backbone_learns_and_keeps_its_normalisation(filaments_model):
    model, history = filaments_model
    assert history.best["val_psnr"] > history.initial["val_psnr"] + 10
    assert model.normalization == NORM
    assert not model.training


def test_finetuning_on_a_new_structure_raises_validation_psnr(filaments_model):
    backbone, _ = filaments_model
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    tuned, history = napari_cnnt.finetune(
        backbone, [pair("puncta", s) for s in range(3)], val_pairs=[pair("puncta", 20), pair("puncta", 21)],
        epochs=8, lr=1e-3, patches_per_sample=4, **{**TINY, "batch_size": 4},
    )
    assert history.best["val_psnr"] > history.initial["val_psnr"] + 0.5
    assert history["val_psnr"][-1] > history.initial["val_psnr"]
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())  # the backbone is untouched
    assert tuned.normalization == backbone.normalization
    assert tuned.metadata["epochs"] == 8 and tuned.metadata["training_data"]["val"] == ["val pair 0", "val pair 1"]


def test_starting_weights_are_kept_when_training_does_not_help(filaments_model):
    """Trained to copy its input (clean = noisy) at a learning rate that wrecks it, the model gets worse."""
    from napari_cnnt.training.recipes import FEW_SAMPLE

    backbone, _ = filaments_model
    copies = [(n, n) for n, _ in (pair("filaments", s) for s in range(3))]
    tuned, history = napari_cnnt.finetune(backbone, copies, val_pairs=[pair("filaments", 10)], lr=0.5, epochs=12,
                                          steps_per_epoch=2, batch_size=2, fast=False)
    assert history.kept_start and history.best_epoch == 0
    assert all(v < history.initial["val_psnr"] for v in history["val_psnr"])
    assert history.summary() == "kept the starting model: validation PSNR did not improve"
    assert tuned.metadata["outcome"] == history.summary()
    assert history.early and len(history) == FEW_SAMPLE.settings.patience  # stopped once it stopped improving
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[k], v, rtol=0, atol=0)


def test_the_former_name_of_progress_still_works_with_a_warning(model):
    events = []
    with pytest.warns(DeprecationWarning, match=r"finetune\(callback=...\) is now finetune\(progress=...\)"):
        napari_cnnt.finetune(model, [pair("filaments", 0)], epochs=1, steps_per_epoch=1, callback=events.append, **TINY)
    assert [e.event for e in events] == ["step", "epoch"]
    with pytest.raises(TypeError, match="both progress= and its former name callback="):
        napari_cnnt.finetune(model, [pair("filaments", 0)], progress=print, callback=print, **TINY)
    with pytest.raises(TypeError, match="stop must be a threading.Event"):
        napari_cnnt.finetune(model, [pair("filaments", 0)], stop=1, **TINY)


def test_history_reports_every_epoch_and_the_progress_every_step(model):
    events = []
    _, history = napari_cnnt.finetune(
        model, [pair("filaments", 0), pair("filaments", 1), pair("filaments", 2)], "reference",
        val_pairs=[pair("filaments", 2)], epochs=2, lr=1e-3, progress=events.append, patch_sizes=(16, 8), time=4,
        batch_size=2, fast=False,
    )
    # 3 pairs train, one validates; 2 patch sizes x 1 batch per epoch
    assert history.split.train == ["pair 0", "pair 1", "pair 2"] and history.split.val == ["val pair 0"]
    assert [(e.event, e.epoch, e.step) for e in events] == [
        ("step", 1, 1), ("step", 1, 2), ("epoch", 1, 2), ("step", 2, 1), ("step", 2, 2), ("epoch", 2, 2),
    ]
    assert events[2].record == history.records[0]
    assert events[0].remaining > 0 and events[2].elapsed > 0
    for r in history.records:
        assert set(r) == {"epoch", "train_loss", "val_loss", "val_psnr", "val_ssim", "val_interlaced_loss",
                          "val_masked_loss", "lr", "seconds"}
        # Every validation sample has truth: no self-supervised score.
        assert np.isnan(r["val_masked_loss"]) and np.isnan(r["val_interlaced_loss"])
        assert r["lr"] == 1e-3 and r["seconds"] > 0 and 0 < r["val_ssim"] <= 1
    assert history.to_csv().splitlines()[0] == (
        "epoch,train_loss,val_loss,val_psnr,val_ssim,val_interlaced_loss,val_masked_loss,lr,seconds")


def test_same_seed_same_losses_other_seed_other_losses(model):
    pairs = [pair("filaments", 0), pair("puncta", 1)]

    def first_epoch(seed):
        _, h = napari_cnnt.finetune(model, pairs, val_pairs=pairs[:1], epochs=1, lr=1e-3, seed=seed, **TINY)
        return h.records[0]["train_loss"], h.records[0]["val_loss"]

    assert first_epoch(3) == first_epoch(3)
    assert first_epoch(3) != first_epoch(4)


def test_stop_mid_epoch_returns_best_weights_and_leaves_a_checkpoint(model, tmp_path):
    stop = threading.Event()
    ckpt = tmp_path / "run.ckpt"
    pairs = [pair("filaments", s) for s in range(4)]
    def callback(p):
        if p.event == "step" and p.epoch == 3 and p.step == 2:
            stop.set()

    tuned, history = napari_cnnt.finetune(
        model, pairs, val_pairs=pairs[:1], epochs=10, lr=1e-3, progress=callback, stop=stop, checkpoint=ckpt,
        patches_per_sample=2, **TINY,
    )
    assert history.stopped and len(history) == 2
    saved = load_checkpoint_model(ckpt)
    assert _same_weights(saved, tuned)
    assert history.best_epoch in (0, 1, 2)
    assert tuned.metadata["stopped_at_epoch"] == "3 of 10"
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary file left

    # A stop before the first step returns the starting weights.
    stop.set()
    again, h0 = napari_cnnt.finetune(model, pairs, val_pairs=pairs[:1], epochs=3, stop=stop, **TINY)
    assert h0.stopped and len(h0) == 0 and _same_weights(again, model)


def test_resume_continues_the_history_exactly(model, tmp_path):
    pairs = [pair("filaments", 0), pair("puncta", 1), pair("filaments", 2)]
    args = dict(recipe="reference", val_pairs=pairs[:1], lr=1e-3, patches_per_sample=2, **TINY)
    full, h_full = napari_cnnt.finetune(model, pairs, epochs=4, **args)

    ckpt = tmp_path / "run.ckpt"
    stop = threading.Event()
    _, h_part = napari_cnnt.finetune(
        model, pairs, epochs=4, checkpoint=ckpt, stop=stop,
        progress=lambda p: stop.set() if p.event == "epoch" and p.epoch == 2 else None, **args,
    )
    assert len(h_part) == 2
    resumed, h_resumed = napari_cnnt.finetune(model, pairs, epochs=4, checkpoint=ckpt, **args)
    assert len(h_resumed) == 4 and not h_resumed.stopped
    np.testing.assert_equal(h_resumed.records[:2], h_part.records)  # NaN where a metric was not measured
    for a, b in zip(h_resumed.records, h_full.records):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    np.testing.assert_equal(h_resumed.initial, h_full.initial)
    assert all(torch.allclose(v, full.state_dict()[k], atol=1e-6) for k, v in resumed.state_dict().items())

    # Extending a finished run trains only the new epochs.
    _, h_more = napari_cnnt.finetune(model, pairs, epochs=5, checkpoint=ckpt, **args)
    assert [r["epoch"] for r in h_more.records] == [1, 2, 3, 4, 5]

    with pytest.raises(CheckpointMismatch, match="settings"):
        napari_cnnt.finetune(model, pairs, epochs=5, checkpoint=ckpt, **{**args, "lr": 2e-3})
    with pytest.raises(CheckpointMismatch, match="train"):
        napari_cnnt.finetune(model, pairs[:2], epochs=5, checkpoint=ckpt, **args)


def test_checkpoint_holds_no_code(model, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    napari_cnnt.finetune(model, [pair("filaments", 0)], epochs=1, checkpoint=ckpt, **TINY)
    state = torch.load(ckpt, weights_only=True)
    assert state["format"] == "napari-cnnt-training"
    ckpt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint_model(ckpt)


@pytest.mark.parametrize("scheduler", ["StepLR", "OneCycleLR", "WarmupCosine", "none"])
def test_schedulers_and_optimiser_options(model, scheduler):
    events = []
    _, h = napari_cnnt.finetune(
        model, [pair("filaments", 0)], epochs=2, steps_per_epoch=5, lr=1e-3, scheduler=scheduler, warmup=0.2,
        no_w_decay=True, clip_grad_norm=0, progress=events.append, **TINY,
    )
    lrs = h["lr"]
    if scheduler == "OneCycleLR":
        assert lrs[0] < 1e-3 and lrs[1] != lrs[0]
    elif scheduler == "WarmupCosine":  # 2 warm-up steps, then a cosine over the other 8
        steps = [e.lr for e in events if e.event == "step"]
        assert steps[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
        assert all(a > b for a, b in zip(steps[2:], steps[3:])) and steps[-1] == pytest.approx(1e-3 * (
            0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * 7 / 8))))
    else:
        assert lrs == [1e-3, 1e-3]


@pytest.mark.bf16
def test_fast_path_matches_float32(model):
    pairs = [pair("filaments", s) for s in range(3)]
    args = dict(val_pairs=[pair("filaments", 9)], epochs=6, lr=1e-3, patches_per_sample=2, patch_sizes=(16,), time=4,
                batch_size=2)
    _, h32 = napari_cnnt.finetune(model, pairs, fast=False, **args)
    _, h16 = napari_cnnt.finetune(model, pairs, fast=True, **args)
    assert h16["val_psnr"][-1] == pytest.approx(h32["val_psnr"][-1], abs=0.1)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"lr": -1e-3}, "lr must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"loss": ("ssim", "nope"), "loss_weights": (1, 1)}, "unknown loss"),
        ({"loss": ("ssim", "mse"), "loss_weights": (1,)}, "one weight per loss"),
        ({"patch_sizes": (15,)}, "not a multiple of 2"),
        ({"scheduler": "cosine"}, "scheduler must be"),
        ({"time": 0}, "time must be"),
        ({"area_thres": 2}, "area_thres"),
        ({"select": "psnr"}, "select must be"),
        ({"augment": ("shear",)}, "unknown augmentation"),
        ({"patience": -1}, "patience must be"),
        ({"warmup": 1.5}, "warmup must be"),
        ({"motion": 0.5}, "motion must be one of flow, none"),
    ],
)
def test_absurd_settings_are_refused(model, options, message):
    args = {**TINY, **options}
    with pytest.raises(ValueError, match=message):
        napari_cnnt.finetune(model, [pair("filaments", 0)], **args)


def test_other_bad_calls(model, tiny_config):
    with pytest.raises(TypeError, match="unknown training option"):
        napari_cnnt.finetune(model, [pair("filaments", 0)], learning_rate=1)
    choices = "few-sample, self-supervised, reference, backbone"
    with pytest.raises(ValueError, match=f"unknown recipe 'paper'; choose from {choices}"):
        napari_cnnt.finetune(model, [pair("filaments", 0)], "paper")
    with pytest.raises(TypeError, match="CNNTDenoiser"):
        napari_cnnt.finetune("model.pt", [pair("filaments", 0)])
    with pytest.raises(TypeError, match="is_set"):
        napari_cnnt.finetune(model, [pair("filaments", 0)], stop=True, **TINY)
    layer = CNNTDenoiser(tiny_config.replace(norm_mode="layer"))
    with pytest.raises(ValueError, match="layer norm"):
        napari_cnnt.finetune(layer, [pair("filaments", 0)], patch_sizes=(16, 8), time=4)
    noisy, clean = pair("filaments", 0)
    with pytest.raises(ValueError, match="same shape"):
        napari_cnnt.finetune(model, [(noisy, clean[:, :-1])], **TINY)


def test_user_data_is_not_modified(model):
    noisy, clean = pair("filaments", 0)
    copies = noisy.copy(), clean.copy()
    napari_cnnt.finetune(model, [(noisy, clean)], epochs=1, **TINY)
    np.testing.assert_array_equal(noisy, copies[0])
    np.testing.assert_array_equal(clean, copies[1])


def test_settings_round_trip():
    s = TrainSettings(patch_sizes=(16, (8, 32)), loss="ssim", loss_weights=(1,))
    assert s.patch_sizes == ((16, 16), (8, 32))
    assert TrainSettings(**{**s.to_dict(), "patch_sizes": s.to_dict()["patch_sizes"]}) == s


def test_finetune_reads_hdf5_training_files(model, tmp_path):
    from napari_cnnt.io.hdf5 import write_training_pairs

    path = tmp_path / "pairs.h5"
    write_training_pairs(path, [pair("puncta", s) for s in range(5)])
    _, history = napari_cnnt.finetune(model, path, epochs=1, **TINY)
    assert history.split.train == [f"pairs.h5:sample_00{i}" for i in range(4)]
    assert history.split.val == ["pairs.h5:sample_004"]
    _, history = napari_cnnt.finetune(model, [path], val_pairs=path, epochs=1, **TINY)
    assert "5 sample(s) both train and validate" in str(history.split)


def test_no_validation_keeps_the_last_weights(model):
    pairs = [pair("filaments", 0), pair("puncta", 1)]
    _, history = napari_cnnt.finetune(model, pairs, val_pairs=[], epochs=2, lr=1e-3, **TINY)
    assert history.split.val == [] and "last epoch" in str(history.split)
    assert history.best_epoch == 2 and history.initial == {}
    assert all(np.isnan(history["val_loss"]))
