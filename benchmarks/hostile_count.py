"""Count how napari-cnnt handles hostile and careless input (the cases of tests/hostile_cases.py).

    python benchmarks/hostile_count.py [SOURCE_TREE ...]

Runs every case against each source tree (its ``src`` folder on PYTHONPATH,
default: this checkout) in a fresh interpreter, and prints per tree and per
class how many attempts were tried and ended in a clear error (or the right
answer), an unclear error, a crash or hang, or lost data (a changed or
half-written file, something left behind, or a wrong result without a word).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
OUTCOMES = ("clear", "unclear", "crash", "lost")

WORKER = r"""
import json, sys, tempfile, pathlib
sys.path.insert(0, sys.argv[1])
import hostile_cases as hc
mount = hc.can_mount()
rows = []
for case in hc.CASES:
    if case.needs_mount and mount:
        rows.append({"id": case.id, "klass": case.klass, "outcome": "skipped", "message": mount})
        continue
    with tempfile.TemporaryDirectory() as d:
        try:
            verdict, _ = hc.attempt(case, pathlib.Path(d))
            row = {"outcome": verdict.outcome, "message": verdict.message[:160], "details": verdict.details}
        except BaseException as e:
            row = {"outcome": "crash", "message": f"{type(e).__name__}: {e}"[:160]}
    row.update(id=case.id, klass=case.klass)
    rows.append(row)
    print(json.dumps(row), flush=True)
"""


def run_tree(tree: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(HERE / "tests")], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        rows = []
        for line in proc.stdout:
            if line.startswith("{"):
                rows.append(json.loads(line))
        proc.wait()
    if proc.returncode:  # the worker itself died (e.g. a segfault): the next cases count as crashes
        sys.path.insert(0, str(HERE / "tests"))
        import hostile_cases as hc

        done = {r["id"] for r in rows}
        rest = [c for c in hc.CASES if c.id not in done]
        rows.append({"id": rest[0].id, "klass": rest[0].klass, "outcome": "crash",
                     "message": f"process died (status {proc.returncode})"} if rest else {})
        if len(rest) > 1:  # go on after the case that killed it
            rows.extend(_rerun_rest(tree, rest[1:]))
    return [r for r in rows if r]


def _rerun_rest(tree: Path, rest) -> list[dict]:
    rows = []
    for case in rest:
        env = dict(os.environ, PYTHONPATH=str(tree / "src"))
        code = WORKER.replace("for case in hc.CASES:", f"for case in [c for c in hc.CASES if c.id == {case.id!r}]:")
        with tempfile.TemporaryDirectory() as cwd:
            proc = subprocess.run([sys.executable, "-c", code, str(HERE / "tests")], cwd=cwd, env=env,
                                  capture_output=True, text=True)
        found = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
        rows.extend(found or [{"id": case.id, "klass": case.klass, "outcome": "crash",
                               "message": f"process died (status {proc.returncode})"}])
    return rows


def table(rows: list[dict]) -> str:
    sys.path.insert(0, str(HERE / "tests"))
    import hostile_cases as hc

    lines = [f"{'class':32} {'tried':>5} " + " ".join(f"{o:>7}" for o in OUTCOMES)]
    tried = [r for r in rows if r["outcome"] != "skipped"]
    for k, name in hc.CLASSES.items():
        sub = [r for r in tried if r["klass"] == k]
        lines.append(f"{k}. {name:29} {len(sub):>5} " + " ".join(f"{sum(r['outcome'] == o for r in sub):>7}"
                                                              for o in OUTCOMES))
    lines.append(f"{'all':32} {len(tried):>5} " + " ".join(f"{sum(r['outcome'] == o for r in tried):>7}"
                                                         for o in OUTCOMES))
    skipped = len(rows) - len(tried)
    if skipped:
        lines.append(f"({skipped} skipped: {next(r['message'] for r in rows if r['outcome'] == 'skipped')})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    trees = [Path(a).resolve() for a in argv] or [HERE]
    for tree in trees:
        rows = run_tree(tree)
        print(f"\n== {tree}")
        print(table(rows))
        if "-v" in os.environ.get("HOSTILE_VERBOSE", "-v"):
            for r in rows:
                if r["outcome"] not in ("clear", "skipped"):
                    print(f"  {r['outcome']:8} {r['id']}: {r.get('message', '')[:120]} {r.get('details', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
