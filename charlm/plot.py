"""`charlm plot`: train and val bpc against characters seen, learning rate on a second axis."""

from __future__ import annotations

import json
from pathlib import Path

from charlm.errors import CharLMError


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise CharLMError(f"{run_dir}: no metrics.jsonl (is it a charlm run folder?)")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    if not rows:
        raise CharLMError(f"{path}: holds no evaluations yet")
    return rows


def plot_run(run_dir: Path) -> Path:
    """Write `run_dir/loss.png` and return its path."""
    rows = read_metrics(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharLMError("charlm plot needs matplotlib: pip install 'charlm[plot]'") from None
    chars = [r["chars"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(chars, [r["train_bpc"] for r in rows], label="train bpc", color="tab:blue")
    ax.plot(chars, [r["val_bpc"] for r in rows], label="val bpc", color="tab:orange", marker="o", ms=3)
    ax.set_xlabel("characters seen")
    ax.set_ylabel("bits per character")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(chars, [r["lr"] for r in rows], label="learning rate", color="tab:gray", ls="--", lw=1)
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    best = min(r["val_bpc"] for r in rows)
    ax.set_title(f"{Path(run_dir).resolve().name}: best val {best:.3f} bpc")
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
