import json
import os
import shutil

import numpy as np
import pytest
import reference_fixtures
import torch

import napari_cnnt
from napari_cnnt import CheckpointError, load_model, save_model
from napari_cnnt.model import CNNTDenoiser, preset
from napari_cnnt.normalization import Normalization


def _same_outputs(a, b, shape=(1, 4, 1, 16, 16)):
    x = torch.rand(shape)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_save_load_round_trip(tmp_path, tiny_config):
    model = CNNTDenoiser(tiny_config.replace(norm_mode="mixed", blocks=(8, 8, 16)))
    model.normalization = Normalization("percentile", 1.5, 99.5)
    path = save_model(model, tmp_path / "m.safetensors", base_model="bundled", epochs=3,
                      metrics={"val_psnr": np.float32(31.5)}, training_data="2 pairs")
    loaded = load_model(path)
    assert isinstance(loaded, CNNTDenoiser) and not loaded.training
    assert loaded.config == model.config
    assert loaded.normalization == model.normalization
    assert loaded.metadata["epochs"] == 3
    assert loaded.metadata["metrics"]["val_psnr"] == pytest.approx(31.5)
    assert loaded.metadata["base_model"] == "bundled"
    assert loaded.metadata["napari_cnnt_version"] == napari_cnnt.__version__
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert _same_outputs(model, loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left


def test_save_is_atomic(tmp_path, tiny_config, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_model(CNNTDenoiser(tiny_config), path, epochs=1)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", broken_fsync)
    with pytest.raises(CheckpointError, match="m.safetensors: could not be written: disk full"):
        save_model(CNNTDenoiser(tiny_config), path, epochs=2, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# A reference checkpoint that keeps the reference's attn.mask buffers, with its run JSON.
WITH_MASKS = reference_fixtures.FOLDER / f"{reference_fixtures.WITH_MASKS[0]}.pt"


def test_reference_checkpoint_with_config_argument(tmp_path):
    assert any(k.endswith("attn.mask") for k in torch.load(WITH_MASKS, weights_only=True))
    pt = tmp_path / "weights.pt"
    shutil.copy(WITH_MASKS, pt)
    with pytest.raises(CheckpointError, match="weights.json"):
        load_model(pt)
    run = json.loads(WITH_MASKS.with_suffix(".json").read_text())
    a = load_model(pt, config=run)
    b = load_model(pt, config=WITH_MASKS.with_suffix(".json"))
    assert a.normalization == Normalization("fixed", 0, 65536)
    assert _same_outputs(a, b, (1, 2, 1, 32, 32))
    # re-saved in napari-cnnt's format it gives the same numbers, without the mask buffers
    out = save_model(a, tmp_path / "converted.safetensors")
    c = load_model(out)
    assert not any(k.endswith("attn.mask") for k in c.state_dict())
    assert _same_outputs(a, c, (1, 2, 1, 32, 32))
    assert out.stat().st_size < 0.95 * pt.stat().st_size


def test_reference_checkpoint_with_napari_cnnt_configuration():
    """A .pt whose JSON is napari-cnnt's configuration (widths a reference run JSON cannot hold)."""
    pt = reference_fixtures.FOLDER / "small.pt"
    a = load_model(pt)
    assert a.config == preset("small")
    assert _same_outputs(a, load_model(pt, config=preset("small")), (1, 2, 1, 32, 32))


def test_reference_checkpoint_with_wrong_architecture():
    run = json.loads(WITH_MASKS.with_suffix(".json").read_text())
    run["blocks_per_set"] += 1
    with pytest.raises(CheckpointError, match="missing"):
        load_model(WITH_MASKS, config=run)
    run["blocks_per_set"] -= 2
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(WITH_MASKS, config=run)
    run["blocks_per_set"] += 1
    run["blocks"] = run["blocks"][:-1] + [2 * run["blocks"][-1]]
    with pytest.raises(CheckpointError, match="shape"):
        load_model(WITH_MASKS, config=run)


def test_bundled_model_missing_is_explained(monkeypatch, tmp_path):
    from napari_cnnt.model import checkpoint

    monkeypatch.setattr(checkpoint, "BUNDLED_WEIGHTS", tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="no bundled model weights"):
        load_model()


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_native_file(tmp_path, tiny_config, cut):
    path = save_model(CNNTDenoiser(tiny_config), tmp_path / "m.safetensors")
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*truncated"):
        load_model(bad)


def test_truncated_reference_file(tmp_path):
    bad = tmp_path / "bad.pt"
    data = WITH_MASKS.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    shutil.copy(WITH_MASKS.with_suffix(".json"), tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match=r"bad\.pt.*(truncated|corrupted)"):
        load_model(bad)


def test_foreign_files(tmp_path):
    junk = tmp_path / "random.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match=r"random\.pt.*not a CNNT model file"):
        load_model(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors"):
        load_model(empty)
    with pytest.raises(CheckpointError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")
    # a valid safetensors file that is not a napari-cnnt model
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a napari-cnnt model"):
        load_model(tmp_path / "other.safetensors")
    # a torch file holding something other than a state dict
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "list.json").write_text(json.dumps({"blocks": [8, 8]}))
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_model(tmp_path / "list.pt")


class _Payload:
    def __reduce__(self):
        return (print, ("executed",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, path)
    (tmp_path / "evil.json").write_text(json.dumps({"blocks": [8, 8]}))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path)
    assert "executed" not in capsys.readouterr().out


def test_newer_format_version_is_refused(tmp_path, tiny_config):
    from safetensors.torch import save_file

    model = CNNTDenoiser(tiny_config)
    meta = {"format": "napari-cnnt", "format_version": "99", "config": tiny_config.to_json(),
            "normalization": json.dumps(model.normalization.to_dict())}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "new.safetensors"), meta)
    with pytest.raises(CheckpointError, match="version '99'"):
        load_model(tmp_path / "new.safetensors")


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_saved_files_get_ordinary_permissions(tmp_path, tiny_config):
    old = os.umask(0o022)
    try:
        path = save_model(CNNTDenoiser(tiny_config), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_header_length_starting_with_the_pickle_byte_is_still_read_as_safetensors(tmp_path, tiny_config):
    model = CNNTDenoiser(tiny_config)
    path = tmp_path / "m.safetensors"
    for pad in range(300):  # headers are padded to 8 bytes: one length in 32 starts with 0x80
        save_model(model, path, note="x" * pad, overwrite=True)
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert load_model(path).metadata["note"] == "x" * pad
