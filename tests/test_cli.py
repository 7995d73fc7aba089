"""The napari-cnnt command line: round trips through TIFF and HDF5, help, and one-line errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from napari_cnnt import denoise
from napari_cnnt.cli import build_parser, default_output, main
from napari_cnnt.io import hdf5, tiff
from napari_cnnt.model import CNNTConfig, CNNTDenoiser
from napari_cnnt.model.checkpoint import save_model
from napari_cnnt.normalization import Normalization

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = CNNTConfig(blocks=(8, 8), blocks_per_set=1, n_head=2, pre_channels=(4, 8), time=4, height=16, width=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CNNTDenoiser(TINY).eval()
    m.normalization = Normalization("fixed", 0.0, 1000.0)
    return m


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture
def stack():
    return (np.random.default_rng(0).random((6, 20, 24)) * 900).astype(np.uint16)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, err


def expected(data, model, **kwargs):
    return denoise(data, model, device="cpu", **kwargs)


def test_tiff_round_trip_keeps_axes_and_pixel_size(tmp_path, capsys, stack, model, model_file):
    src, dst = tmp_path / "cells.tif", tmp_path / "clean.tif"
    tiff.write_tiff(src, stack, axes="TYX", scale=(2.0, 0.25, 0.25), unit="um")
    before = src.read_bytes()
    code, err = run(capsys, "denoise", src, "-o", dst, "--model", model_file, "--device", "cpu")
    assert code == 0, err
    assert "tile/s" in err  # the progress bar
    [image] = tiff.read_tiff(dst)
    assert image.axes == "TYX" and image.unit == "um" and image.data.dtype == np.float32
    np.testing.assert_allclose(image.scale, (2.0, 0.25, 0.25), rtol=1e-6)
    np.testing.assert_allclose(image.data, expected(stack, model), rtol=1e-6, atol=1e-3)
    assert src.read_bytes() == before


def test_hdf5_round_trip_keeps_the_dataset_name_axes_and_pixel_size(tmp_path, capsys, model, model_file):
    data = (np.random.default_rng(1).random((3, 5, 20, 20)) * 900).astype(np.float32)  # [C, T, Y, X]
    src, dst = tmp_path / "in.h5", tmp_path / "out.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("movie/raw", data=data)
        f["movie/raw"].attrs["axes"] = "CTYX"
        f["movie/raw"].attrs["element_size_um"] = [1.0, 3.0, 0.5, 0.5]
    code, err = run(capsys, "denoise", src, "-o", dst, "--model", model_file, "--device", "cpu",
                    "--tile", 4, 16, 16, "--overlap", 1, 4, 4, "--batch-size", 3)
    assert code == 0, err
    image = hdf5.read_dataset(dst, "movie/raw")
    try:
        assert image.axes == "CTYX" and image.unit == "um"
        np.testing.assert_allclose(image.scale, (1.0, 3.0, 0.5, 0.5))
        want = expected(data, model, time_axis=1, tile=(4, 16, 16), overlap=(1, 4, 4), batch_size=3)
        np.testing.assert_allclose(image.data[()], want, rtol=1e-6, atol=1e-3)
    finally:
        image.data.file.close()


def test_default_output_is_beside_the_input(tmp_path, capsys, stack, model_file):
    src = tmp_path / "cells.ome.tif"
    tiff.write_tiff(src, stack, axes="TYX")
    assert default_output(src) == tmp_path / "cells_denoised.ome.tif"
    code, err = run(capsys, "denoise", src, "--model", model_file, "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "cells_denoised.ome.tif").is_file()


def test_refuses_to_overwrite_its_input(tmp_path, capsys, stack, model_file):
    src = tmp_path / "cells.tif"
    tiff.write_tiff(src, stack, axes="TYX")
    before = src.read_bytes()
    code, err = run(capsys, "denoise", src, "-o", tmp_path / "." / "cells.tif", "--model", model_file)
    assert code == 1
    assert "refusing to overwrite the input" in err and len(err.strip().splitlines()) == 1
    assert src.read_bytes() == before


def not_an_image(path):
    path.write_text("hello")
    return path


def two_datasets(path):
    with h5py.File(path, "w") as f:
        f["a"] = np.zeros((4, 16, 16), np.float32)
        f["b"] = np.zeros((4, 16, 16), np.float32)
    return path


def nan_stack(path):
    data = np.zeros((4, 16, 16), np.float32)
    data[1, 2, 3] = np.nan
    tiff.write_tiff(path, data, axes="TYX")
    return path


def no_time_axis(path):
    with h5py.File(path, "w") as f:
        f["z"] = np.zeros((2, 3, 16, 16), np.float32)
        f["z"].attrs["axes"] = "ZCYX"
    return path


@pytest.mark.parametrize("make_input,extra,message", [
    (lambda p: p / "missing.tif", [], "no such file"),
    (lambda p: not_an_image(p / "notes.tif"), [], "neither a TIFF nor an HDF5"),
    (lambda p: two_datasets(p / "two.h5"), [], "choose one with --dataset"),
    (lambda p: two_datasets(p / "two.h5"), ["--dataset", "c"], "no dataset 'c'"),
    (lambda p: two_datasets(p / "two.h5"), ["--dataset", "a", "-o", "x.png"], "unknown output format '.png'"),
    (lambda p: two_datasets(p / "two.h5"), ["--dataset", "a", "--tile", "4", "15", "16"], "not a multiple of 2"),
    (lambda p: two_datasets(p / "two.h5"), ["--dataset", "a", "--model", "nowhere.pt"], "no such model file"),
    (lambda p: nan_stack(p / "nan.tif"), [], "NaN or infinite"),
    (lambda p: no_time_axis(p / "z.h5"), [], "--time-axis"),
])
def test_bad_input_ends_with_one_line(tmp_path, capsys, model_file, make_input, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = make_input(tmp_path)
    args = ["denoise", src, "--device", "cpu"] + extra
    if "--model" not in extra:
        args += ["--model", model_file]
    code, err = run(capsys, *args)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("napari-cnnt denoise: error:") and message in last
    assert not list(tmp_path.glob("*_denoised*")) and not (tmp_path / "x.png").exists()


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "denoise" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["denoise", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    denoise_parser = build_parser()._subparsers._group_actions[0].choices["denoise"]
    for action in denoise_parser._actions:
        for flag in action.option_strings or [action.metavar]:
            assert flag in text
        assert action.help and action.help in " ".join(text.split())


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_demo_reports_psnr_of_the_sample(tmp_path, capsys, model, model_file):
    from napari_cnnt.metrics import psnr_db
    from napari_cnnt.synthetic import sample_recording

    out = tmp_path / "denoised.tif"
    code = main(["demo", "--model", str(model_file), "-o", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    noisy, clean = sample_recording()
    result = tiff.read_tiff(out)[0].data
    np.testing.assert_allclose(result, denoise(noisy, model), rtol=1e-5, atol=1e-2)
    expected_line = f"PSNR {psnr_db(noisy, clean):.2f} dB noisy -> {psnr_db(result, clean):.2f} dB denoised"
    assert expected_line in stdout


def test_demo_without_bundled_model_says_so(capsys, monkeypatch, tmp_path):
    from napari_cnnt.model import checkpoint

    monkeypatch.setattr(checkpoint, "BUNDLED_WEIGHTS", tmp_path / "absent.safetensors")
    code, stderr = run(capsys, "demo")
    assert code == 1
    assert "no bundled model" in stderr and "--model" in stderr


def test_simulate_writes_reproducible_training_pairs(tmp_path, capsys):
    from napari_cnnt.synthetic import random_recording

    first, again = tmp_path / "a.h5", tmp_path / "b.h5"
    args = ["--count", "3", "--shape", "4", "32", "24", "--seed", "7", "--structures", "puncta", "membranes"]
    assert main(["simulate", str(first), *args]) == 0
    assert main(["simulate", str(again), *args]) == 0
    pairs = hdf5.read_training_pairs(first)
    assert [name for name, _, _ in pairs] == ["sample_000", "sample_001", "sample_002"]
    for i, (_, noisy, clean) in enumerate(pairs):
        expected_noisy, expected_clean, _ = random_recording((4, 32, 24), seed=7 + i,
                                                             structures=("puncta", "membranes"))
        np.testing.assert_array_equal(noisy[()], expected_noisy)
        np.testing.assert_array_equal(clean[()], expected_clean)
    for (_, n1, c1), (_, n2, c2) in zip(pairs, hdf5.read_training_pairs(again)):
        np.testing.assert_array_equal(n1[()], n2[()])
        np.testing.assert_array_equal(c1[()], c2[()])


@pytest.mark.parametrize(
    "args, message",
    [
        (["out.tif"], "HDF5"),
        (["out.h5", "--count", "0"], "--count"),
        (["out.h5", "--shape", "4", "4", "4"], "--shape"),
        (["out.h5", "--count", "100000", "--shape", "100", "512", "512"], "GB"),
    ],
)
def test_simulate_refuses_bad_options(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, stderr = run(capsys, "simulate", *args)
    assert code == 1 and message in stderr
    assert not list(tmp_path.iterdir())


def test_simulate_refuses_unknown_structures(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["simulate", str(tmp_path / "x.h5"), "--structures", "ribosomes"])
    assert e.value.code == 2
    assert "ribosomes" in capsys.readouterr().err


@pytest.mark.bf16
def test_fast_path_can_be_switched_off(tmp_path, capsys, stack, model, model_file):
    from napari_cnnt.runtime import Runtime

    src = tmp_path / "cells.tif"
    tiff.write_tiff(src, stack, axes="TYX")
    results = {}
    for flag, fast in (("--no-fast", False), ("--fast", True)):
        dst = tmp_path / f"{flag[2:]}.tif"
        code, err = run(capsys, "denoise", src, "-o", dst, "--model", model_file, "--device", "cpu", flag)
        assert code == 0, err
        results[fast] = tiff.read_tiff(dst)[0].data
        np.testing.assert_array_equal(results[fast], denoise(stack, model, device=Runtime.create("cpu", fast)))
    assert not np.array_equal(results[True], results[False])  # the flag chose the arithmetic


@pytest.mark.parametrize("command", ["denoise", "demo", "finetune"])
def test_fast_path_on_a_cpu_without_bf16_is_one_line(tmp_path, capsys, monkeypatch, stack, model_file, no_bf16,
                                                     command):
    monkeypatch.chdir(tmp_path)
    tiff.write_tiff("cells.tif", stack, axes="TYX")
    hdf5.write_training_pairs("pairs.h5", [(stack, stack)] * 2)
    argv = {
        "denoise": ["denoise", "cells.tif", "-o", "out.tif", "--model", model_file],
        "demo": ["demo", "--model", model_file, "-o", "out.tif"],
        "finetune": ["finetune", "--h5files", "pairs.h5", "--load_path", model_file, "-o", "out.safetensors"],
    }[command]
    code, err = run(capsys, *argv, "--device", "cpu", "--fast")
    assert code == 1
    assert err.count("\n") == 1 and "cannot run the bfloat16 fast path" in err, err
    assert not list(tmp_path.glob("out*"))


def test_no_fast_runs_on_a_cpu_without_bf16(tmp_path, capsys, stack, model, model_file, no_bf16):
    src, dst = tmp_path / "cells.tif", tmp_path / "out.tif"
    tiff.write_tiff(src, stack, axes="TYX")
    for flags in ((), ("--no-fast",)):
        code, err = run(capsys, "denoise", src, "-o", dst, "--model", model_file, "--device", "cpu", *flags)
        assert code == 0, err
        np.testing.assert_array_equal(tiff.read_tiff(dst)[0].data, expected(stack, model))
        dst.unlink()
