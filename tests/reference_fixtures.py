"""The reference fixtures kept in ``tests/fixtures`` (see its README): names and how each was made.

Each fixture is a checkpoint in the reference implementation's format with
the reference's outputs for a fixed input and, for some, for a whole stack
tiled the reference's way.
"""

from __future__ import annotations

import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parent / "fixtures"
META = json.loads((FOLDER / "meta.json").read_text())["fixtures"]
NAMES = sorted(META)
TILED = sorted(name for name, meta in META.items() if "tiled" in meta)
WITH_MASKS = sorted(name for name, meta in META.items() if meta["mask_buffers_saved"])
