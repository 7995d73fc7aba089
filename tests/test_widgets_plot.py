"""The fine-tune widget's chart: axis labels stay distinct and readable however small the range."""

import math

import pytest

from napari_cnnt.napari.widgets._plot import LossPlot, ticks


@pytest.mark.parametrize("lo, hi", [(33.46, 33.54), (0.01231, 0.01236), (20.0, 45.0), (-2.0, 2.0), (0.05, 1.05)])
def test_ticks_are_round_distinct_and_inside_the_range(lo, hi):
    values, labels = zip(*ticks(lo, hi))
    assert 2 <= len(values) <= 4
    assert len(set(labels)) == len(labels)
    margin = (hi - lo) * 1e-9
    assert all(lo - margin <= v <= hi + margin for v in values)
    assert [float(label) for label in labels] == pytest.approx(values, abs=(hi - lo) * 1e-6)
    assert list(values) == sorted(values)


def test_a_flat_psnr_curve_gets_distinct_labels_and_draws(qtbot):
    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.resize(360, 200)
    records = [{"epoch": e, "train_loss": 0.2 - e / 100, "val_loss": 0.21 - e / 100, "val_psnr": 33.48 + e / 100}
               for e in (1, 2, 3)]
    plot.set_records(records, epochs=3)
    lo, hi = plot.ranges()[True]
    labels = [label for _, label in ticks(lo, hi)]
    assert len(labels) >= 2 and len(set(labels)) == len(labels)
    assert all(math.isclose(float(label), 33.5, abs_tol=0.05) for label in labels)
    image = plot.grab().toImage()  # paints without error
    assert image.width() == 360


def test_axis_labels_of_a_run_without_truth_fit_beside_the_plot(qtbot):
    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.resize(300, 180)
    records = [{"epoch": e, "train_loss": 0.012 - e / 1000, "val_interlaced_loss": 0.007351 - e * 1e-5}
               for e in (1, 2, 3, 4)]
    plot.set_records(records, epochs=12)
    assert [name for _, name, _, _ in plot.series] == ["train loss", "validation in-between-frame loss"]
    widths, fm = plot.axis_widths(), plot.fontMetrics()
    for right, (lo, hi) in plot.ranges().items():
        labels = [label for _, label in ticks(lo, hi)]
        assert max(len(label) for label in labels) >= 5  # many decimals on both axes
        assert all(fm.horizontalAdvance(label) + 4 <= widths[right] for label in labels)
    assert plot.grab().toImage().width() == 300
