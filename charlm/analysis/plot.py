"""`charlm plot`: train and val bpc against characters seen, learning rate on a second axis."""

from __future__ import annotations

import io
from pathlib import Path

from charlm.errors import require_extra
from charlm.fs import replace_file
from charlm.storage.rundir import PLOT, RunDir


def plot_run(run_dir: Path) -> Path:
    """Write `run_dir/loss.png` and return its path."""
    run = RunDir(run_dir)
    rows = run.read_metrics()
    require_extra("charlm plot", "plot", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
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
    ax.legend(lines, [str(ln.get_label()) for ln in lines], loc="upper right")
    best = min(r["val_bpc"] for r in rows)
    ax.set_title(f"{Path(run_dir).resolve().name}: best val {best:.3f} bpc")
    fig.tight_layout()
    out = run / PLOT
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    # Atomic like every file of a run: a reader never sees half a picture, a full disk
    # leaves the previous plot.
    replace_file(out, buf.getvalue())
    return out
