"""bioimage.io model packages: exported, validated offline by bioimageio.spec and bioimageio.core,
reproduced from their own weights, and read back by ``load_model``."""

from __future__ import annotations

import contextlib
import importlib
import shutil
import socket
import zipfile

import numpy as np
import pytest
import tifffile
import torch
from bioimageio.spec import load_description
from bioimageio.spec.model import v0_5

import napari_cnnt
from napari_cnnt import CheckpointError, load_model, save_model
from napari_cnnt.cli import main
from napari_cnnt.model import CNNTDenoiser
from napari_cnnt.model.bioimageio import REPRODUCE_TOLERANCE, _spec, offline, save_package, urls
from napari_cnnt.normalization import Normalization
from napari_cnnt.runtime import Runtime
from napari_cnnt.synthetic import simulate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = Runtime.create("cpu", fast=False)


@contextlib.contextmanager
def no_network():
    """Any attempt to open a network connection fails the test."""
    real = socket.socket.connect

    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"the test tried to reach the network ({address})")

    socket.socket.connect = refuse
    try:
        yield
    finally:
        socket.socket.connect = real


@pytest.fixture(scope="module")
def bundled_package(tmp_path_factory):
    path = tmp_path_factory.mktemp("bioimageio") / "cnnt.zip"
    with no_network():
        assert save_model(load_model(), path, format="bioimageio") == path
    return path


@pytest.fixture
def fixed_model(tiny_config):
    torch.manual_seed(0)
    model = CNNTDenoiser(tiny_config).eval()
    model.normalization = Normalization("fixed", 100, 180)
    model.metadata = {"training": {"epochs": 2, "lr": 1e-3, "loss": ["mse"], "loss_weights": [1.0]}}
    return model


def _described(path):
    with no_network():
        descr = load_description(path, perform_io_checks=True, known_files={u: None for u in urls()})
    assert isinstance(descr, v0_5.ModelDescr), descr.validation_summary.display() or descr
    return descr


def _array(descr, tensor):
    from bioimageio.spec.utils import load_array

    return load_array(tensor.test_tensor)


def _apply(steps, x):
    """The spec's processing steps, written out here from their definitions in the spec."""
    names = ["batch", "time", "channel", "y", "x"]
    for step in steps:
        if step.id == "ensure_dtype":
            x = x.astype(step.kwargs.dtype)
        elif step.id == "scale_range":
            axes = tuple(names.index(str(a)) for a in step.kwargs.axes)
            lo = np.percentile(x, step.kwargs.min_percentile, axis=axes, keepdims=True)
            hi = np.percentile(x, step.kwargs.max_percentile, axis=axes, keepdims=True)
            x = ((x - lo) / (hi - lo + step.kwargs.eps)).astype(np.float32)
        elif step.id == "scale_linear":
            x = (x * step.kwargs.gain + step.kwargs.offset).astype(np.float32)
        else:
            raise AssertionError(f"unexpected processing step {step.id}")
    return x


def _run(network, descr, x):
    with torch.no_grad():
        y = network(torch.from_numpy(_apply(descr.inputs[0].preprocessing, x))).numpy()
    return _apply(descr.outputs[0].postprocessing, y)


def test_bundled_package_passes_bioimageio_validation_offline(bundled_package):
    from bioimageio.core import test_model

    descr = _described(bundled_package)
    summary = descr.validation_summary
    assert summary.status == "valid-format" and not summary.errors
    names = set(zipfile.ZipFile(bundled_package).namelist())
    assert {"rdf.yaml", "weights.pt", "weights_torchscript.pt", "test_input.npy", "test_output.npy",
            "cover.png", "README.md", "environment.yaml"} <= names
    assert descr.license == "BSD-3-Clause" and "2404.04726" in descr.cite[0].text
    assert [a.id for a in descr.inputs[0].axes] == ["batch", "time", "channel", "y", "x"]
    assert [p.id for p in descr.inputs[0].preprocessing][:2] == ["ensure_dtype", "scale_range"]
    assert descr.config.model_extra["napari_cnnt"]["provenance"]["metrics"]["test_psnr"] > 38
    with no_network(), offline(_spec()):  # bioimageio.core runs the weights on the test data and other sizes
        result = test_model(bundled_package, weight_format="pytorch_state_dict")
    assert result.status == "passed", [d.errors for d in result.details if d.status != "passed"]


def test_bundled_package_reproduces_its_test_output_from_either_weights(bundled_package, tmp_path):
    descr = _described(bundled_package)
    x, expected = _array(descr, descr.inputs[0]), _array(descr, descr.outputs[0])
    assert x.shape == (1, 16, 1, 64, 64) and expected.shape == x.shape
    weights = descr.weights.pytorch_state_dict
    architecture = getattr(importlib.import_module(weights.architecture.import_from), weights.architecture.callable)
    with zipfile.ZipFile(bundled_package) as z:
        z.extractall(tmp_path)
    network = architecture(**weights.architecture.kwargs).eval()
    network.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    np.testing.assert_allclose(_run(network, descr, x), expected, rtol=0, atol=REPRODUCE_TOLERANCE)
    scripted = torch.jit.load(str(tmp_path / "weights_torchscript.pt"))
    np.testing.assert_allclose(_run(scripted, descr, x), expected, rtol=0, atol=REPRODUCE_TOLERANCE)
    bigger = np.random.default_rng(0).uniform(0, 1, (1, 5, 1, 40, 72)).astype(np.float32)  # another size
    with torch.no_grad():
        np.testing.assert_allclose(scripted(torch.from_numpy(bigger)).numpy(),
                                   network(torch.from_numpy(bigger)).numpy(), rtol=0, atol=1e-5)


def test_load_model_reads_the_package_back_to_the_same_model(bundled_package):
    bundled, loaded = load_model(), load_model(bundled_package)
    assert loaded.config == bundled.config and loaded.normalization == bundled.normalization
    assert all(torch.equal(a, b) for a, b in zip(bundled.state_dict().values(), loaded.state_dict().values()))
    assert loaded.metadata["metrics"] == bundled.metadata["metrics"]
    assert loaded.metadata["file"] == "cnnt.zip"
    descr = _described(bundled_package)
    x = _array(descr, descr.inputs[0])
    np.testing.assert_allclose(_run(loaded, descr, x), _array(descr, descr.outputs[0]), rtol=0,
                               atol=REPRODUCE_TOLERANCE)
    raw = x[0, :, 0]
    np.testing.assert_array_equal(napari_cnnt.denoise(raw, loaded, device=CPU),
                                  napari_cnnt.denoise(raw, bundled, device=CPU))


def test_a_fixed_scale_folder_package_passes_bioimageio_core_and_matches_denoise(fixed_model, tmp_path):
    from bioimageio.core import test_model

    raw = simulate((6, 40, 40), ("puncta",), seed=3)[0]
    folder = save_package(fixed_model, tmp_path / "tiny", {"training_data": "2 simulated pairs"},
                          name="tiny CNNT", authors=["A. Tester"], test_input=raw)
    descr = _described(folder / "rdf.yaml")
    assert [a.name for a in descr.authors] == ["A. Tester"] and descr.name == "tiny CNNT"
    assert [p.id for p in descr.outputs[0].postprocessing][0] == "scale_linear"  # back to camera units
    with no_network(), offline(_spec()):
        result = test_model(folder / "rdf.yaml")
    assert result.status == "passed", [d.errors for d in result.details if d.status != "passed"]
    x, y = _array(descr, descr.inputs[0]), _array(descr, descr.outputs[0])
    assert x.shape == (1, 4, 1, 40, 40)  # the model's 4 frames, the stack's 40 x 40 pixels
    np.testing.assert_array_equal(x[0, :, 0], raw[:4])
    whole = napari_cnnt.denoise(x[0, :, 0], fixed_model, tile=(4, 40, 40), overlap=(0, 0, 0), device=CPU)
    np.testing.assert_allclose(y[0, :, 0], whole, rtol=1e-5, atol=1e-3)
    assert load_model(folder).normalization == fixed_model.normalization


def test_layer_norm_models_declare_their_fixed_frame_size(fixed_model, tmp_path):
    model = CNNTDenoiser(fixed_model.config.replace(norm_mode="layer")).eval()
    path = save_package(model, tmp_path / "layer.zip", {})
    axes = _described(path).inputs[0].axes
    assert (axes[3].size, axes[4].size) == (16, 16)
    assert axes[1].size.min == 1  # any number of frames


def test_packages_of_other_models_and_damaged_weights_are_refused(fixed_model, tmp_path):
    folder = save_package(fixed_model, tmp_path / "tiny", {})
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    rdf = foreign / "rdf.yaml"
    rdf.write_text(rdf.read_text().replace("import_from: napari_cnnt.model.denoiser", "import_from: other.unet"))
    with pytest.raises(CheckpointError, match="not a CNNT model of napari-cnnt .other.unet.CNNTDenoiser"):
        load_model(foreign)
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    weights = damaged / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        load_model(damaged)
    with pytest.raises(CheckpointError, match="carry their own configuration"):
        load_model(folder, config={"blocks": [8, 16]})


def test_cli_exports_a_package_and_converts_it_back(fixed_model, tmp_path, capsys):
    model_file = save_model(fixed_model, tmp_path / "tiny.safetensors")
    stack = simulate((5, 24, 36), ("puncta",), seed=4)[0]
    tifffile.imwrite(tmp_path / "cells.tif", stack, imagej=True, metadata={"axes": "TYX"})
    out = tmp_path / "tiny.zip"
    assert main(["export", str(out), "--model", str(model_file), "--name", "my model!", "--author", "A. Tester",
                 "--test-input", str(tmp_path / "cells.tif")]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    descr = _described(out)
    assert descr.name == "my model" and [a.name for a in descr.authors] == ["A. Tester"]
    np.testing.assert_array_equal(_array(descr, descr.inputs[0])[0, :, 0], stack[:4].astype(np.float32))  # 4 frames
    back = tmp_path / "back.safetensors"
    assert main(["export", str(back), "--model", str(out)]) == 0
    reloaded = load_model(back)
    assert all(torch.equal(a, b) for a, b in zip(fixed_model.state_dict().values(), reloaded.state_dict().values()))
    assert reloaded.normalization == fixed_model.normalization
    assert main(["export", str(tmp_path / "x.zip"), "--model", str(tmp_path / "missing.safetensors")]) == 1
    assert "missing.safetensors: no such model file" in capsys.readouterr().err


def test_unknown_formats_and_wrong_kinds_of_targets_are_refused(fixed_model, tmp_path):
    with pytest.raises(ValueError, match="format must be one of napari-cnnt, bioimageio"):
        save_model(fixed_model, tmp_path / "m.onnx", format="onnx")
    (tmp_path / "notes").write_text("a file, not a folder")
    with pytest.raises(ValueError, match="notes: exists and is not a folder"):
        save_package(fixed_model, tmp_path / "notes", {})
    (tmp_path / "dir.zip").mkdir()
    with pytest.raises(ValueError, match="dir.zip: exists and is not a zip file"):
        save_package(fixed_model, tmp_path / "dir.zip", {})
    assert (tmp_path / "notes").read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.zip", "notes"]  # nothing else written
