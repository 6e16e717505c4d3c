"""Metrics: Zoology-style accuracy, the ``metrics.jsonl`` log and the ``curves.png`` plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from zoo.data.base import IGNORE_INDEX


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the logits: ``targets[:, t] = labels[:, t + 1]``, the last column ignored."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def per_example_accuracy(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Accuracy of each example over its labelled positions (Zoology's metric before averaging examples).

    ``preds`` and ``targets`` are ``(B, L)`` and aligned; examples with no labelled position are dropped.
    """
    mask = targets != IGNORE_INDEX
    count = mask.sum(1)
    correct = ((preds == targets) & mask).sum(1)
    keep = count > 0
    return correct[keep].double() / count[keep].double()


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write ``rows`` as JSON lines, atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Save a PNG with loss (train, eval) and accuracy (train, eval) against step, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label, style in (("train/loss", "train", "-"), ("eval/loss", "eval", "o-")):
        xs, ys = series(key)
        if xs:
            ax_loss.plot(xs, ys, style, label=label, markersize=3)
    for key, label, style in (("train/accuracy", "train", "-"), ("eval/accuracy", "eval", "o-")):
        xs, ys = series(key)
        if xs:
            ax_acc.plot(xs, ys, style, label=label, markersize=3)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
