"""The run report's figure: training loss and dev metric against steps, with the zero-shot line."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_path: Path, title: str = "") -> None:
    """Write ``curves.png``: loss (left) and dev metric (right) vs step; zero-shot dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    dev = [(r["step"], r["dev"]) for r in records if "dev" in r and not r.get("zero_shot")]
    zero = next((r["dev"] for r in records if r.get("zero_shot")), None)
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 4))
    if loss:
        ax_loss.plot(*zip(*loss), color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="training loss (mean over log interval)", title="loss")
    if dev:
        ax_dev.plot(*zip(*dev), marker="o", color="tab:green", label="dev")
    if zero is not None:
        ax_dev.axhline(zero, color="gray", linestyle="--", label=f"zero-shot ({zero:.1f})")
    ax_dev.set(xlabel="step", ylabel="dev metric (%)", title="dev")
    ax_dev.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(out_path).with_name(Path(out_path).name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
