"""Hostile and careless input (tests/hostile_cases.py): every case ends in a clear, one-line
refusal (or the right answer), existing files stay byte-identical and nothing is left behind."""

from __future__ import annotations

import re

import hostile_cases as hc
import pytest

MOUNT = hc.can_mount()


def test_every_class_has_cases():
    classes = hc.by_class()
    assert set(classes) == set(hc.CLASSES)
    assert len(hc.CASES) >= 60


@pytest.mark.parametrize("case", hc.CASES, ids=[c.id for c in hc.CASES])
def test_hostile_case(case, tmp_path):
    if case.needs_mount and MOUNT:
        pytest.skip(MOUNT)
    verdict, result = hc.attempt(case, tmp_path)
    assert verdict.outcome == "clear", (verdict.outcome, verdict.message, verdict.details)
    if case.expect and case.good is None or (case.expect and result.error is not None):
        assert re.search(case.expect, verdict.message), verdict.message
        assert len(verdict.message.splitlines()) == 1
    if result.error is not None:
        assert isinstance(result.error, (ValueError, TypeError))
