"""curves.png: a lone loss point is visible, both panels span the same steps, and the test score of
the best-dev parameters is on the figure."""
import json

import matplotlib.figure
import pytest

from zotune.report import plot_curves


@pytest.fixture
def figure_of(monkeypatch, tmp_path):
    """plot_curves on some metrics records; returns the figure it saved (and saves it)."""
    saved = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)

    def run(records):
        metrics = tmp_path / "metrics.jsonl"
        metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
        plot_curves(metrics, tmp_path / "curves.png", title="t")
        assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
        return saved[-1]
    return run


ZERO = {"step": 0, "dev": 50.0, "test": 49.0, "zero_shot": True}


def test_a_single_loss_point_is_drawn(figure_of):
    fig = figure_of([ZERO, {"step": 1, "loss": 0.7}, {"step": 1, "dev": 55.0}])
    ax_loss = fig.axes[0]
    (line,) = ax_loss.lines
    assert list(line.get_xdata()) == [1] and line.get_marker() not in (None, "None", "", " ")


def test_panels_share_steps_and_show_the_test_score(figure_of):
    records = [ZERO] + [{"step": s, "loss": 1.0 / s} for s in range(1, 11)] + [
        {"step": 5, "dev": 60.0}, {"step": 10, "dev": 58.0},
        {"step": 5, "test": 57.5, "best_dev_checkpoint": True}]
    fig = figure_of(records)
    ax_loss, ax_dev = fig.axes[:2]
    assert ax_loss.get_xlim() == pytest.approx(ax_dev.get_xlim())
    low, high = ax_dev.get_xlim()
    assert low <= 0 and high >= 10  # from the zero-shot step to the last step
    tests = [line for line in ax_dev.lines if "test" in str(line.get_label())]
    assert len(tests) == 1 and "57.5" in tests[0].get_label()
    assert list(tests[0].get_xdata()) == [5] and list(tests[0].get_ydata()) == [57.5]
