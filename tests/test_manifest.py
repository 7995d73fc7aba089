"""The npe2 manifest: valid, importable, and the one the package ships."""

from __future__ import annotations

from pathlib import Path

from npe2 import PluginManifest

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_is_valid_and_its_commands_import():
    manifest = PluginManifest.from_file(ROOT / "napari.yaml")
    manifest.validate_imports()
    commands = {c.id for c in manifest.contributions.commands}
    assert {r.command for r in manifest.contributions.readers} <= commands
    assert {w.command for w in manifest.contributions.writers} <= commands
    assert {s.command for s in manifest.contributions.sample_data} <= commands


def test_package_ships_the_root_manifest():
    """src/napari_cnnt/napari.yaml links to the root file, so both installs load the same one."""
    link = ROOT / "src" / "napari_cnnt" / "napari.yaml"
    assert link.is_symlink() and link.resolve() == (ROOT / "napari.yaml").resolve()
