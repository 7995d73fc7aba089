"""The package as a user and napari meet it: imports, manifest, README and CI."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK_QT = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'napari', 'magicgui', 'superqt'}:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
"""


def test_core_runs_without_qt_or_napari():
    code = BLOCK_QT + """
import torch, napari_cnnt
from napari_cnnt import load_model, save_model, CNNTConfig, CNNTDenoiser
from napari_cnnt import losses, runtime
m = CNNTDenoiser(CNNTConfig(blocks=(8, 8), blocks_per_set=1, n_head=2, pre_channels=(4, 8)))
print(m(torch.rand(1, 2, 1, 8, 8)).shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 2, 1, 8, 8])" in out.stdout


def test_manifest_is_the_root_file_and_validates():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-cnnt")
    assert manifest.name == "napari-cnnt"
    import yaml

    assert manifest.display_name == yaml.safe_load((ROOT / "napari.yaml").read_text())["display_name"]
    packaged = ROOT / "src" / "napari_cnnt" / "napari.yaml"
    assert packaged.resolve() == (ROOT / "napari.yaml").resolve()
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-cnnt"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout.lower()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```bash\n")[1:]]
    assert "pytest" in blocks[1] and "pip install" in blocks[1]
    assert "pip install" in blocks[0]
    # the first two code blocks come before any other text section
    assert readme.index(blocks[1]) < readme.index("## ")


HUGE_PAGES_PROBE = """
import os, sys, napari_cnnt
assert 'torch' not in sys.modules  # the setting must precede torch
import torch
x = torch.ones(64 << 20, dtype=torch.uint8)
with open('/proc/self/smaps_rollup') as f:
    kb = next(int(line.split()[1]) for line in f if line.startswith('AnonHugePages:'))
print(os.environ['THP_MEM_ALLOC_ENABLE'], kb >> 10)
"""


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages on this system")
@pytest.mark.parametrize("given,expected", [(None, "1"), ("0", "0")])
def test_large_tensors_get_huge_pages_unless_switched_off(given, expected):
    env = {k: v for k, v in __import__("os").environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    setting, huge_mb = out.stdout.split()
    assert setting == expected
    if expected == "1":
        assert int(huge_mb) >= 32  # most of the 64 MB tensor
    elif _thp_mode() == "madvise":
        assert int(huge_mb) < 32  # PyTorch's default: small pages only
