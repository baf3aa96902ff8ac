"""The run report's figure: training loss and dev metric against steps, with the zero-shot line
and the test score of the best-dev parameters."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def curves_figure(records: list[dict], title: str = ""):
    """The figure of :func:`plot_curves` from metrics.jsonl's records: loss (left), dev metric
    and the test score at the best dev step (right), zero-shot dashed; both panels over the same
    steps (0 to the last logged step), and a lone point drawn as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    dev = [(r["step"], r["dev"]) for r in records if "dev" in r and not r.get("zero_shot")]
    zero = next((r["dev"] for r in records if r.get("zero_shot")), None)
    test = next((r for r in reversed(records) if r.get("best_dev_checkpoint") and r.get("test") is not None),
                None)
    # image tasks (train_images.py) have no dev split: their periodic evaluation is on test
    tests = [(r["step"], r["test"]) for r in records if r.get("test") is not None and "dev" not in r
             and not r.get("best_dev_checkpoint") and not r.get("zero_shot")]
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    if loss:  # markers where a line alone would be invisible (one point) or hide the points
        ax_loss.plot(*zip(*loss), color="tab:blue", marker="o" if len(loss) <= 20 else None,
                     markersize=4)
    ax_loss.set(xlabel="step", ylabel="training loss (mean over log interval)", title="loss")
    if dev:
        ax_dev.plot(*zip(*dev), marker="o", color="tab:green", label="dev")
    if tests:
        ax_dev.plot(*zip(*tests), marker="o", color="tab:red", label="test")
    if zero is not None:
        ax_dev.axhline(zero, color="gray", linestyle="--", label=f"zero-shot dev ({zero:.1f})")
    if test is not None:
        ax_dev.plot([test["step"]], [test["test"]], marker="*", markersize=14, linestyle="none",
                    color="tab:red", label=f"test, best-dev step {test['step']} ({test['test']:.1f})")
    ax_dev.set(xlabel="step", ylabel="metric (%)", title="dev and test")
    if ax_dev.get_legend_handles_labels()[0]:
        ax_dev.legend(loc="lower right")
    last = max((r.get("step") or 0 for r in records), default=0)
    pad = max(1.0, 0.03 * last)
    ax_dev.set_xlim(-pad, last + pad)  # shared: the loss panel gets the same range
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(metrics_path: Path, out_path: Path, title: str = "") -> None:
    """Write ``curves.png``: loss (left) and dev metric with the test score (right) vs step."""
    fig = curves_figure(read_metrics(metrics_path), title)  # (selects the Agg backend)
    import matplotlib.pyplot as plt

    tmp = Path(out_path).with_name(Path(out_path).name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
