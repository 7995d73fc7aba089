"""What the benchmarks share: each measured run in a fresh process, and the CSV of the rows measured so far."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent / "src")
MARK = "RESULT "


def report(row: dict) -> None:
    """In the child process: hand the measured row back to the parent."""
    print(MARK + json.dumps(row), flush=True)


def run_child(script: str, spec: dict, env_extra: dict | None = None) -> dict:
    """``script --child SPEC`` in a fresh process (this checkout's package first on the path); its row."""
    env = {**os.environ, **(env_extra or {}), "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], env=env, capture_output=True,
                         text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"run {spec} failed")
    return json.loads(line[len(MARK):])


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def write_csv(rows: list[dict], path: Path, columns: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
